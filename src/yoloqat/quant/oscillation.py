"""Track weight oscillations during QAT (Nagel et al. 2022, Sec. 4.1).

Per quantized weight and tracked step t, with x = w / s the latent weight in units of the scale:

* ``w_int(t) = clamp(round(x), -int_max, int_max)`` and ``delta(t) = w_int(t) - w_int(t-1)``;
* an oscillation ``o(t) = 1`` happens when ``delta(t) != 0`` and its sign is opposite to the
  sign of that weight's last non-zero delta;
* the frequency is an EMA, ``f(t) = m * o(t) + (1 - m) * f(t-1)``, and a weight counts as
  oscillating when ``f > threshold`` (Nagel: m = 0.01, threshold = 0.005).

Companions: the flip rate (fraction of weights whose integer changed this step), the fraction
sitting on a rounding boundary (``|x - round(x)| > 0.5 - boundary``) and how far the scales
moved since tracking began.

One engine, :class:`OscillationGroup`, holds the state of one or more layers in flat buffers
and does the update as a handful of whole-buffer ops (int8 for the integer state, counts kept
as device tensors so a GPU is never synchronised until the stats are read);
:class:`LayerOscillationState` is one layer's view of it and its statistics.  A layer tracked
alone is a group of one.  :class:`OscillationTracker` finds the quantized convs of a live model
and updates their groups after optimizer steps.

Fused tracking (:class:`FusedOscillationGroup`, the default for max-abs layers on CUDA): every
layer of one bit width in one group, so an update is ~20 whole-model kernels instead of ~20 per
layer.  On a GPU per-layer updates are launch-bound (about a hundred layers, each a few kernels
on small tensors); the same element-wise operations on the same values, with integer counts,
give every statistic bit for bit (tested).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch
from brevitas.nn import QuantConv2d
from torch import nn

from yoloqat.quant.batched_fake_quant import maxabs_scale, segment_absmax, segment_lengths
from yoloqat.quant.convert import FastQuantConv2d, weight_scale

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


class LayerOscillationState:
    """Oscillation state of one quantized weight tensor: a view of its segment of an
    :class:`OscillationGroup` (the one engine), created by the group or, for a state used on its
    own, at its first :meth:`update` (a group of one).

    ``update(x, scale)`` takes ``x = w / s`` (float, any shape) and the scale it was computed
    with.  The first call only initialises; every later call produces one delta per weight.
    Statistics accumulate until :meth:`pop_stats`; the whole-run totals are kept as well.
    ``x`` is neither modified nor kept; ``scale`` is kept by reference until the next update.
    """

    def __init__(
        self,
        int_max: int,
        momentum: float = 0.01,
        threshold: float = 0.005,
        boundary: float = 0.05,
    ) -> None:
        if int_max < 1:
            raise ValueError(f"int_max must be >= 1, got {int_max}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.int_max = int(int_max)
        # int8 holds every delta (|delta| <= 2 * int_max) up to 7 bits; wider ranges use int16.
        self.int_dtype = torch.int8 if 2 * self.int_max <= 127 else torch.int16
        self.momentum = float(momentum)
        self.threshold = float(threshold)
        self.boundary = float(boundary)
        self.numel = 0
        # where this layer lives in its group: weights [offset, offset + numel), scale rows
        # [row, row + rows) shaped scale_shape (set by the group)
        self.group: OscillationGroup | None = None
        self.offset = 0
        self.shape: torch.Size | None = None
        self.row = 0
        self.rows = 0
        self.scale_shape: torch.Size | None = None
        # Window accumulators (0-d int64 tensors on the weight's device) and run totals.
        self._n = 0
        self._flips: torch.Tensor | None = None
        self._oscs: torch.Tensor | None = None
        self._run_n = 0
        self._run_flips = 0
        self._run_oscs = 0

    # the layer's part of the group's buffers (None before the first update)
    def _weights(self, flat: torch.Tensor | None) -> torch.Tensor | None:
        if flat is None or self.shape is None:
            return None
        return flat[self.offset : self.offset + self.numel].view(self.shape)

    def _rows(self, flat: torch.Tensor | None) -> torch.Tensor | None:
        if flat is None or self.scale_shape is None:
            return None
        return flat[self.row : self.row + self.rows].view(self.scale_shape)

    @property
    def prev_int(self) -> torch.Tensor | None:
        """int8 (int16 above 7 bits): the integers of the latest update."""
        return self._weights(self.group.prev_int) if self.group is not None else None

    @property
    def last_sign(self) -> torch.Tensor | None:
        """{-1, 0, 1}: the sign of each weight's last non-zero delta."""
        return self._weights(self.group.last_sign) if self.group is not None else None

    @property
    def freq(self) -> torch.Tensor | None:
        """float32 EMA of oscillations."""
        return self._weights(self.group.freq) if self.group is not None else None

    @property
    def _x(self) -> torch.Tensor | None:
        """The clamped ``x`` of the latest update."""
        return self._weights(self.group.x) if self.group is not None else None

    @property
    def scale(self) -> torch.Tensor | None:
        """The latest scale (kept by reference, read lazily)."""
        return self._rows(self.group.scale) if self.group is not None else None

    @property
    def scale0(self) -> torch.Tensor | None:
        """float32 scale at the first update that gave one."""
        return self._rows(self.group.scale0) if self.group is not None else None

    @property
    def initialised(self) -> bool:
        return self.group is not None and self.group.prev_int is not None

    @torch.no_grad()
    def update(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """One tracked step.  ``x`` is neither modified nor kept; ``scale`` is kept by
        reference until the next update (pass a fresh tensor, as the tracker does)."""
        if self.group is None:
            OscillationGroup([self], [x.shape], self.int_max)
        assert self.group is not None and self.shape is not None
        if len(self.group.states) > 1:
            raise TypeError("a fused layer is updated by its OscillationGroup")
        if x.shape != self.shape:
            raise ValueError(f"shape changed: {tuple(self.shape)} -> {tuple(x.shape)}")
        # round(clamp(x)) == clamp(round(x)) for integer bounds.  The clamped x is kept for the
        # near-boundary statistic (a weight clamped at the range edge cannot flip there).
        xc = x.detach().to(torch.float32).clamp(-self.int_max, self.int_max)
        rows = None
        if scale is not None:
            rows = scale.detach()
            if self.scale_shape is None:
                self.scale_shape, self.rows = rows.shape, rows.numel()
            rows = rows.reshape(-1)
        self.group.advance(xc.reshape(-1), rows)

    # ---------------------------------------------------------------------------------------
    # reading

    def _latest(self) -> dict[str, float]:
        """Statistics of the current state (not windowed)."""
        freq, x, prev_int = self.freq, self._x, self.prev_int
        if freq is None or x is None or prev_int is None:
            return {
                "frac_oscillating": 0.0,
                "mean_freq": 0.0,
                "frac_near_boundary": 0.0,
                "scale_drift": math.nan,
            }
        n = float(self.numel)
        # prev_int == round(clamped x) of the latest update
        near = torch.count_nonzero((x - prev_int).abs_() > 0.5 - self.boundary)
        frac_osc = torch.count_nonzero(freq > self.threshold)
        return {
            "frac_oscillating": frac_osc.item() / n,
            "mean_freq": freq.double().mean().item(),
            "frac_near_boundary": near.item() / n,
            "scale_drift": self.scale_drift(),
        }

    def scale_drift(self) -> float:
        """Mean over channels of ``|s_now - s_first| / s_first`` (nan when no scale was given)."""
        scale, scale0 = self.scale, self.scale0
        if scale is None or scale0 is None:
            return math.nan
        s0 = scale0.double().reshape(-1)
        s = scale.detach().to(device=s0.device, dtype=torch.float64).reshape(-1)
        return ((s - s0).abs() / s0.clamp_min(1e-30)).mean().item()

    def _window(self) -> tuple[int, int, int]:
        if self.group is not None:
            self.group.flush()
        if self._n == 0 or self._flips is None or self._oscs is None:
            return 0, 0, 0
        return self._n, int(self._flips.item()), int(self._oscs.item())

    def _rates(self, n: int, flips: int, oscs: int) -> dict[str, float]:
        denom = float(n * self.numel)
        return {
            "updates": n,
            "weights": self.numel,
            "flip_rate": flips / denom if denom else 0.0,
            "osc_rate": oscs / denom if denom else 0.0,
        }

    def pop_stats(self) -> dict[str, float]:
        """Stats since the last pop; resets the window.

        ``updates`` counts the updates that produced deltas (the initialising one does not),
        ``flip_rate`` / ``osc_rate`` are means over those updates (0.0 if there were none);
        ``frac_oscillating``, ``mean_freq``, ``frac_near_boundary`` and ``scale_drift`` describe
        the latest state.
        """
        n, flips, oscs = self._window()
        out: dict[str, Any] = self._rates(n, flips, oscs)
        out.update(self._latest())
        self._run_n += n
        self._run_flips += flips
        self._run_oscs += oscs
        self._n = 0
        if self._flips is not None and self._oscs is not None:
            self._flips.zero_()
            self._oscs.zero_()
        return out

    def run_stats(self) -> dict[str, float]:
        """Like :meth:`pop_stats` but over the whole run, without resetting anything."""
        n, flips, oscs = self._window()
        out: dict[str, Any] = self._rates(
            self._run_n + n, self._run_flips + flips, self._run_oscs + oscs
        )
        out.update(self._latest())
        return out


# -------------------------------------------------------------------------------------------
# the engine


class OscillationGroup:
    """The oscillation state of one or more weight tensors of one integer range, in flat
    buffers: the one engine, for a single layer (a group of one) and for every max-abs layer of
    one bit width at once (:class:`FusedOscillationGroup`).

    :meth:`advance` does Nagel's update once over all the group's weights, a fixed number of
    whole-buffer kernels whatever the number of layers.  Flips and oscillations are counted per
    weight (int32) and summed per layer only when statistics are read (:meth:`flush`), so
    nothing waits for the device per step.  Each layer's :class:`LayerOscillationState` reads
    its segment of the buffers as views; the float reductions of its statistics run per layer.
    """

    def __init__(
        self,
        states: list[LayerOscillationState],
        shapes: list[torch.Size],
        int_max: int,
        scale_shapes: list[torch.Size] | None = None,
    ) -> None:
        self.states = states
        self.int_max = int(int_max)
        self.int_dtype = states[0].int_dtype
        self.momentum = states[0].momentum
        self.numels = [math.prod(shape) for shape in shapes]
        self.total = sum(self.numels)
        self.prev_int: torch.Tensor | None = None
        self.last_sign: torch.Tensor | None = None
        self.freq: torch.Tensor | None = None
        self.x: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None  # per row, flat
        self.scale0: torch.Tensor | None = None
        self.flips: torch.Tensor | None = None  # int32 per weight, since the last flush
        self.oscs: torch.Tensor | None = None
        self.pending = 0  # updates not yet folded into the layers' window counts
        offset = row = 0
        for i, (st, shape, n) in enumerate(zip(states, shapes, self.numels, strict=True)):
            st.group, st.offset, st.shape, st.numel = self, offset, torch.Size(shape), n
            offset += n
            if scale_shapes is not None:
                st.scale_shape = torch.Size(scale_shapes[i])
                st.row, st.rows = row, math.prod(st.scale_shape)
                row += st.rows

    @torch.no_grad()
    def advance(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """One tracked step: ``x`` is the clamped ``w / s`` of every weight (flat float32; the
        group keeps it), ``scale`` the scale of every row (flat; None keeps the last one)."""
        w_int = torch.round(x).to(self.int_dtype)
        if scale is not None:
            if self.scale0 is None:
                self.scale0 = scale.to(torch.float32).clone()
            self.scale = scale
        if self.prev_int is None or self.last_sign is None or self.freq is None:
            self._start(x, w_int)
            return
        assert self.flips is not None and self.oscs is not None
        # Integer arithmetic only (comparisons to bool and torch.where are several times slower
        # on CPU).  sign in {-1, 0, 1}; sign * last_sign == -1 exactly when the weight moved
        # against its last move (last_sign == 0, never moved, gives 0).
        sign = torch.sub(w_int, self.prev_int).sign_()
        neg_osc = torch.mul(sign, self.last_sign).clamp_(max=0)  # -1 where oscillating, else 0
        # Keep the last non-zero sign: clamp(2 * sign + last, -1, 1) is sign if sign != 0.
        self.last_sign.add_(sign, alpha=2).clamp_(-1, 1)
        # f = m * o + (1 - m) * f
        self.freq.mul_(1.0 - self.momentum).sub_(neg_osc, alpha=self.momentum)
        self.flips.add_(sign.abs_())
        self.oscs.sub_(neg_osc)
        self.prev_int, self.x = w_int, x
        self.pending += 1

    def _start(self, x: torch.Tensor, w_int: torch.Tensor) -> None:
        dev = x.device
        self.prev_int, self.x = w_int, x
        self.last_sign = torch.zeros_like(w_int)
        self.freq = torch.zeros(w_int.shape, dtype=torch.float32, device=dev)
        self.flips = torch.zeros(w_int.shape, dtype=torch.int32, device=dev)
        self.oscs = torch.zeros(w_int.shape, dtype=torch.int32, device=dev)
        for st in self.states:
            st._flips = torch.zeros((), dtype=torch.int64, device=dev)
            st._oscs = torch.zeros((), dtype=torch.int64, device=dev)

    @torch.no_grad()
    def flush(self) -> None:
        """Fold the per-weight counts of the pending updates into each layer's window."""
        if not self.pending or self.flips is None or self.oscs is None:
            return
        for st in self.states:
            assert st._flips is not None and st._oscs is not None
            st._flips += self.flips[st.offset : st.offset + st.numel].sum()
            st._oscs += self.oscs[st.offset : st.offset + st.numel].sum()
            st._n += self.pending
        self.flips.zero_()
        self.oscs.zero_()
        self.pending = 0


class FusedOscillationGroup(OscillationGroup):
    """The max-abs (FastQuantConv2d) layers of one bit width, as one group: per update one
    ``cat`` of the weights, the per-channel (or per-tensor) max-abs of every layer in one
    ``segment_absmax`` (shared with the batched fake-quant pass), then :meth:`advance`.

    Why it equals tracking each layer alone, bit for bit: every step is element-wise or a max
    (both order-free), with the same operands and Python-number scalars as
    ``convert.weight_scale``; the counts are integers; the float reductions of the statistics
    (mean frequency, scale drift) run per layer on the same values.
    """

    def __init__(
        self, modules: list[FastQuantConv2d], states: list[LayerOscillationState], int_max: int
    ) -> None:
        self.modules = modules
        rows = [m.weight.shape[0] if m.fast_per_channel else 1 for m in modules]
        scale_shapes = [
            torch.Size((r, *([1] * (m.weight.dim() - 1)))) if m.fast_per_channel else torch.Size(())
            for m, r in zip(modules, rows, strict=True)
        ]
        super().__init__(states, [m.weight.shape for m in modules], int_max, scale_shapes)
        self.row_lengths = segment_lengths(
            [m.weight for m in modules], [bool(m.fast_per_channel) for m in modules]
        )
        self._lengths: torch.Tensor | None = None

    @torch.no_grad()
    def _scale_and_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale per row, clamped w / s, flat)`` as ``weight_scale`` and ``update`` compute them."""
        flat = torch.cat([m.weight.detach().reshape(-1) for m in self.modules])
        if self._lengths is None or self._lengths.device != flat.device:
            self._lengths = torch.tensor(self.row_lengths, dtype=torch.int64, device=flat.device)
        absmax = segment_absmax(flat, self._lengths)
        # the same division as convert.weight_scale (see maxabs_scale), so the bits agree
        scale = maxabs_scale(absmax, self.int_max)
        per_weight = torch.repeat_interleave(scale, self._lengths, output_size=self.total)
        x = flat.div_(per_weight).clamp_(-self.int_max, self.int_max)
        return scale, x

    @torch.no_grad()
    def update(self) -> None:
        scale, x = self._scale_and_latent()
        self.advance(x, scale)


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
