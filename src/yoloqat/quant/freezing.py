"""Iterative weight freezing (Nagel et al. 2022, Sec. 5.2), driven by the oscillation tracker.

Per quantized weight the freezer keeps an EMA of its integer value,
``int_ema(t) = m * w_int(t) + (1 - m) * int_ema(t-1)`` with the tracker's momentum m, started at
the first tracked integer.  After every tracker update, a weight whose oscillation frequency (the
tracker's EMA ``f``) exceeds ``threshold`` is frozen for the rest of training at
``round(int_ema)``: the integer it spent most of its recent time on, not whichever side of the
boundary it happened to be on at that step.  (torch.round: halves go to the even integer.)

A frozen weight gets no further update: its gradient is zeroed before the optimizer step (so it
neither moves nor counts towards gradient clipping), and right after the step its latent weight is
reset to ``integer * current scale`` (weight decay and optimizer momentum still move it
otherwise).  Resetting with the *current* scale keeps the integer fixed when the scale moves
(max-abs scales follow the other weights; learned scales train).  With max-abs scaling the reset
never raises the layer's max |w| (|integer| <= int_max), so it does not move the scale either,
up to float rounding of ``int_max * (max|w| / int_max)``.  That argument holds for max-abs
scaling only: a learned scale moves on its own, and with Brevitas' decoupled quantizer the
integers follow the AbsMaxL2 pre-scale (a norm over all channels' max |w|), which a reset weight
can still move.

Freezing is permanent and per weight; the annealed threshold of the paper is not implemented.
"""

from __future__ import annotations

import torch

from yoloqat.quant.convert import weight_scale
from yoloqat.quant.oscillation import OscillationTracker


class WeightFreezer:
    """Freeze the oscillating weights of the layers an :class:`OscillationTracker` follows.

    Call :meth:`mask_grads` before each optimizer step, :meth:`apply` right after it (before any
    EMA reads the weights) and :meth:`update` after each tracker update that returned True.
    """

    def __init__(self, tracker: OscillationTracker, threshold: float) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"freeze threshold must be in (0, 1], got {threshold}")
        self.tracker = tracker
        self.threshold = float(threshold)
        n = len(tracker.layers)
        self.int_ema: list[torch.Tensor | None] = [None] * n  # float32 EMA of the integers
        self.frozen: list[torch.Tensor | None] = [None] * n  # bool, True where frozen
        self.frozen_int: list[torch.Tensor | None] = [None] * n  # float32 integer of frozen weights

    # No host-device sync per step (a GPU would stall once per layer): the masks are applied to
    # every tracked layer whether or not anything is frozen yet; counts are read once per epoch.

    @torch.no_grad()
    def update(self) -> None:
        """Advance the integer EMAs, freeze newly oscillating weights and set them at once."""
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
            newly = (state.freq > self.threshold) & ~frozen
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
