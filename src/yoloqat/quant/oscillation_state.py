"""Weight oscillations during QAT (Nagel et al. 2022, Sec. 4.1): the statistics and their engine.

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
and updates their groups after optimizer steps (:mod:`yoloqat.quant.oscillation`).
"""

from __future__ import annotations

import math
from typing import Any

import torch


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
    def _weights(self, buffer: str) -> torch.Tensor | None:
        flat = getattr(self.group, buffer) if self.group is not None else None
        if flat is None or self.shape is None:
            return None
        return flat[self.offset : self.offset + self.numel].view(self.shape)

    def _rows(self, buffer: str) -> torch.Tensor | None:
        flat = getattr(self.group, buffer) if self.group is not None else None
        if flat is None or self.scale_shape is None:
            return None
        return flat[self.row : self.row + self.rows].view(self.scale_shape)

    @property
    def prev_int(self) -> torch.Tensor | None:
        """int8 (int16 above 7 bits): the integers of the latest update."""
        return self._weights("prev_int")

    @property
    def last_sign(self) -> torch.Tensor | None:
        """{-1, 0, 1}: the sign of each weight's last non-zero delta."""
        return self._weights("last_sign")

    @property
    def freq(self) -> torch.Tensor | None:
        """float32 EMA of oscillations."""
        return self._weights("freq")

    @property
    def _x(self) -> torch.Tensor | None:
        """The clamped ``x`` of the latest update."""
        return self._weights("x")

    @property
    def scale(self) -> torch.Tensor | None:
        """The latest scale (kept by reference, read lazily)."""
        return self._rows("scale")

    @property
    def scale0(self) -> torch.Tensor | None:
        """float32 scale at the first update that gave one."""
        return self._rows("scale0")

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
    one bit width at once (:class:`~yoloqat.quant.oscillation_fused.FusedOscillationGroup`).

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
