"""Iterative weight freezing (Nagel et al. 2022, Sec. 5.2), driven by the oscillation tracker.

Per quantized weight the freezer keeps an EMA of its integer value,
``int_ema(t) = m * w_int(t) + (1 - m) * int_ema(t-1)`` with the tracker's momentum m, started at
the first tracked integer.  After every tracker update, a weight whose oscillation frequency (the
tracker's EMA ``f``) exceeds the threshold of that step (:func:`freeze_threshold_at`) is
frozen for the rest of training at ``round(int_ema)``: the integer it spent most of its recent
time on, not whichever side of the boundary it happened to be on at that step.  (torch.round:
halves go to the even integer.)

A frozen weight gets no further update: its gradient is zeroed before the optimizer step (so it
neither moves nor counts towards gradient clipping), and right after the step its latent weight is
reset to ``integer * current scale`` (weight decay and optimizer momentum still move it
otherwise), with the grid scale the forward rounds on (:func:`yoloqat.quant.convert.weight_scale`:
the pre-scale of a decoupled quantizer).  Resetting with the *current* scale keeps the integer
fixed when the scale moves.  With max-abs scaling the reset never raises the layer's (or
channel's) max |w| (|integer| <= int_max), so it leaves the scale alone up to float rounding of
``int_max * (max|w| / int_max)``, unless the frozen weight was itself the largest and is reset
below it (frozen at an integer under int_max while it sat at the top), which lowers the scale.
Learned scales move on their own, and the decoupled quantizer's per-tensor AbsMaxL2 pre-scale
(the root mean square over channels of each channel's max |w|) moves with any channel's largest
weight.

Freezing is permanent and per weight.  The threshold is constant, or annealed as in the paper's
code (Qualcomm's oscillations-qat): no freezing before ``anneal_start`` (a fraction of the
optimizer steps), then a half cosine from the start threshold down to the end threshold at the
last step.  A frequency threshold only means something against the tracker's momentum m: one
isolated oscillation lifts ``f`` by m, so a threshold of m freezes any weight that oscillates
twice within about 1/m steps; the reference code advises a threshold of at least 2-3 m (its
4-bit setting anneals 0.1 -> 0.01 with m = 0.001).  The reference starts its integer EMA when
freezing starts; here it runs from the first tracked step, so it is settled by then.
"""

from __future__ import annotations

import math

import torch

from yoloqat.quant.convert import weight_scale
from yoloqat.quant.oscillation import OscillationTracker


def freeze_threshold_at(
    step: int, total: int, start: float, end: float | None = None, anneal_start: float = 0.0
) -> float | None:
    """The freezing threshold after optimizer step ``step`` of ``total`` (None: no freezing yet).

    ``end`` None: ``start`` throughout.  Otherwise None before ``anneal_start * total`` steps,
    then ``end + (start - end) * (1 + cos(pi * r)) / 2`` with ``r`` the fraction of the steps
    from there to ``total`` that have passed (``start`` at r = 0, ``end`` from r = 1 on)."""
    if end is None:
        return start
    begin = anneal_start * total
    if step < begin:
        return None
    span = total - begin
    r = min((step - begin) / span, 1.0) if span > 0 else 1.0
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * r))


class WeightFreezer:
    """Freeze the oscillating weights of the layers an :class:`OscillationTracker` follows.

    Call :meth:`mask_grads` before each optimizer step, :meth:`apply` right after it (before any
    EMA reads the weights) and :meth:`update` after each tracker update that returned True.
    ``threshold_end`` / ``anneal_start`` / ``total_steps``: the annealing of
    :func:`freeze_threshold_at`, over the tracker's step count (its calls, one per optimizer step).
    """

    def __init__(
        self,
        tracker: OscillationTracker,
        threshold: float,
        threshold_end: float | None = None,
        anneal_start: float = 0.0,
        total_steps: int = 1,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"freeze threshold must be in (0, 1], got {threshold}")
        if threshold_end is not None and not 0.0 < threshold_end <= threshold:
            raise ValueError(
                f"freeze threshold end must be in (0, {threshold}], got {threshold_end}"
            )
        self.tracker = tracker
        self.threshold = float(threshold)
        self.threshold_end = threshold_end
        self.anneal_start = float(anneal_start)
        self.total_steps = int(total_steps)
        self.last_threshold: float | None = None  # the threshold of the latest update
        n = len(tracker.layers)
        self.int_ema: list[torch.Tensor | None] = [None] * n  # float32 EMA of the integers
        self.frozen: list[torch.Tensor | None] = [None] * n  # bool, True where frozen
        self.frozen_int: list[torch.Tensor | None] = [None] * n  # float32 integer of frozen weights

    # No host-device sync per step (a GPU would stall once per layer): the masks are applied to
    # every tracked layer whether or not anything is frozen yet; counts are read once per epoch.

    @torch.no_grad()
    def update(self) -> None:
        """Advance the integer EMAs, freeze newly oscillating weights and set them at once."""
        threshold = self.last_threshold = freeze_threshold_at(
            self.tracker.calls,
            self.total_steps,
            self.threshold,
            self.threshold_end,
            self.anneal_start,
        )
        for i, (_, _, _, state) in enumerate(self.tracker.layers):
            if state.prev_int is None or state.freq is None:
                continue
            ints = state.prev_int.to(torch.float32)
            if self.int_ema[i] is None:
                self.int_ema[i] = ints.clone()
                self.frozen[i] = torch.zeros(ints.shape, dtype=torch.bool, device=ints.device)
                self.frozen_int[i] = torch.zeros_like(ints)
                continue  # the tracker's first update only initialises: no frequency yet
            ema, frozen, fint = self.int_ema[i], self.frozen[i], self.frozen_int[i]
            assert ema is not None and frozen is not None and fint is not None
            ema.mul_(1.0 - state.momentum).add_(ints, alpha=state.momentum)
            if threshold is None:
                continue  # before the annealing starts: the EMAs run, nothing freezes
            newly = (state.freq > threshold) & ~frozen
            fint.copy_(torch.where(newly, torch.round(ema), fint))
            frozen |= newly
        self.apply()

    @torch.no_grad()
    def mask_grads(self) -> None:
        for i, (_, q, _, _) in enumerate(self.tracker.layers):
            if self.frozen[i] is not None and q.weight.grad is not None:
                q.weight.grad.masked_fill_(self.frozen[i], 0.0)  # type: ignore[arg-type]

    @torch.no_grad()
    def apply(self) -> None:
        """Reset every frozen latent weight to its integer times the layer's current scale."""
        for i, (_, q, _, _) in enumerate(self.tracker.layers):
            frozen, fint = self.frozen[i], self.frozen_int[i]
            if frozen is None or fint is None:
                continue
            w = q.weight
            target = (fint * weight_scale(q)).to(w.dtype)
            w.copy_(torch.where(frozen, target, w))

    def frozen_count(self) -> tuple[int, int]:
        """(frozen weights, tracked weights)."""
        frozen = sum(int(torch.count_nonzero(f)) for f in self.frozen if f is not None)
        total = sum(state.numel for *_, state in self.tracker.layers)
        return frozen, total

    def frac_frozen(self) -> float:
        frozen, total = self.frozen_count()
        return frozen / total if total else 0.0
