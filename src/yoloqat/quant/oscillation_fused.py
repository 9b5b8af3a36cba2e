"""Fused oscillation tracking: every max-abs layer of one bit width in one
:class:`~yoloqat.quant.oscillation_state.OscillationGroup`.

:class:`FusedOscillationGroup` is the default for max-abs layers on CUDA: with every layer of one
bit width in one group, an update is ~20 whole-model kernels instead of ~20 per
layer.  On a GPU per-layer updates are launch-bound (about a hundred layers, each a few kernels
on small tensors); the same element-wise operations on the same values, with integer counts,
give every statistic bit for bit (tested).
"""

from __future__ import annotations

import torch

from yoloqat.quant.batched_fake_quant import maxabs_scale, segment_absmax, segment_lengths
from yoloqat.quant.convert import FastQuantConv2d
from yoloqat.quant.oscillation_state import LayerOscillationState, OscillationGroup


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
