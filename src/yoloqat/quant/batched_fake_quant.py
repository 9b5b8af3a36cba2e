"""Max-abs fake quantization of many layers' weights in one pass over a flat buffer.

Why hand-written: per layer, max-abs fake quantization is about eight small kernels forward and
ten backward (abs, max, divide, round, clamp, multiply, the scale gradient's reduction and
scatter).  On a GPU those launches, times ~80 convs, cost more than the convolutions of a small
detector (yolov10n at 320 px ran 2.33x the FP32 step on an H200).  Here every layer's weight is
one slice of a single flat tensor, each output channel (or whole tensor) one *segment*, and the
same arithmetic runs once over all of them: a fixed number of kernels per step whatever the
layer count.  No library offers a segmented max-abs quantizer with Brevitas' gradient.

The arithmetic is elementwise the same as :func:`yoloqat.quant.convert.fake_quant_maxabs`:
``scale = max(|w|, 1e-10) / int_max`` per segment, ``q = clamp(round(w / scale), ±int_max)``,
output ``q * scale``, so the forward is bit-identical.  The backward is the same gradient
(straight-through for round and clamp, plus the scale path ``sum(grad * (q - w/scale))``
routed to the first max-|w| element of the segment with its sign); only the order of the
floating-point sums differs, so it matches to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def maxabs_scale(absmax: torch.Tensor, int_max: int | torch.Tensor) -> torch.Tensor:
    """``max(absmax, 1e-10) / int_max``, always a true division on the tensor's device.

    Why not ``/ int_max`` with a Python number: on CUDA PyTorch computes a division by a CPU
    scalar as ``a * (1 / b)``, which differs from ``a / b`` in the last bit for about half of
    all values; Brevitas divides by a tensor on the device.  Dividing by a 0-dim tensor on the
    same device keeps every path (Brevitas, per layer, batched, the oscillation tracker) on the
    same bits, on CPU (which divides either way) and CUDA alike.
    """
    divisor = int_max if torch.is_tensor(int_max) else absmax.new_full((), float(int_max))
    return absmax.clamp_min(1e-10) / divisor


def segment_lengths(weights: list[torch.Tensor], per_channel: list[bool]) -> list[int]:
    """Element count of each segment of the flat ``cat`` of ``weights``: one per output channel
    of a per-channel layer, one whole tensor per per-tensor layer."""
    lengths: list[int] = []
    for w, pc in zip(weights, per_channel, strict=True):
        rows = w.shape[0] if pc else 1
        lengths += [w.numel() // rows] * rows
    return lengths


def segment_absmax(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """max(|x|) over each consecutive segment of ``flat`` (``lengths`` on its device).

    The one segmented max-abs of the project: the batched fake-quant pass and the flat
    oscillation tracker both take their scales from it.  ``unsafe=True``: the lengths are right
    by construction; the checked path compares their sum with the data size, a host-device
    sync on every call.  A max is exact in any order, so this equals the per-layer
    ``abs().max(dim=1)`` bit for bit.
    """
    return torch.segment_reduce(flat.abs(), "max", lengths=lengths, unsafe=True)


@dataclass(frozen=True)
class SegmentLayout:
    """Where each layer's weight lies in the flat buffer and how it splits into segments."""

    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]
    lengths: torch.Tensor  # int64 per segment: its element count
    segment_of: torch.Tensor  # int64 per element: its segment (output channel or tensor)
    int_max_of: torch.Tensor  # float per element: the grid's largest integer
    int_max: torch.Tensor  # float per segment
    positions: torch.Tensor  # int64 arange over the elements (the argmax tie rule)
    key: tuple[Any, ...]

    @property
    def segments(self) -> int:
        return int(self.int_max.numel())


def layout_key(weights: list[torch.Tensor], int_maxes: list[int], per_channel: list[bool]) -> tuple:
    first = weights[0]
    return (first.device, first.dtype, tuple(
        (tuple(w.shape), im, pc) for w, im, pc in zip(weights, int_maxes, per_channel)))


def build_layout(weights: list[torch.Tensor], int_maxes: list[int], per_channel: list[bool]) -> SegmentLayout:
    """The flat layout of ``weights``: per channel layers give one segment per output channel."""
    device, dtype = weights[0].device, weights[0].dtype
    seg_int_max: list[float] = []
    for w, im, pc in zip(weights, int_maxes, per_channel, strict=True):
        seg_int_max += [float(im)] * (w.shape[0] if pc else 1)
    sizes = torch.tensor(segment_lengths(weights, per_channel), dtype=torch.int64)
    segment_of = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    int_max = torch.tensor(seg_int_max, dtype=dtype)
    return SegmentLayout(
        shapes=tuple(w.shape for w in weights),
        numels=tuple(w.numel() for w in weights),
        lengths=sizes.to(device),
        segment_of=segment_of.to(device),
        int_max_of=int_max[segment_of].to(device),
        int_max=int_max.to(device),
        positions=torch.arange(segment_of.numel(), device=device),
        key=layout_key(weights, int_maxes, per_channel),
    )


class _SegmentedMaxAbsFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        absmax = segment_absmax(flat, layout.lengths)
        scale = maxabs_scale(absmax, layout.int_max).index_select(0, layout.segment_of)
        x = flat / scale
        q = torch.clamp(torch.round(x), -layout.int_max_of, layout.int_max_of)
        ctx.save_for_backward(flat, q, x, absmax)
        ctx.layout = layout
        return q * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        flat, q, x, absmax = ctx.saved_tensors
        layout: SegmentLayout = ctx.layout
        seg, n = layout.segment_of, flat.numel()
        grad_scale = torch.zeros_like(absmax).index_add_(0, seg, grad * (q - x))
        grad_absmax = torch.where(absmax > 1e-10, grad_scale / layout.int_max, 0.0)
        # torch.max(dim) routes to the first maximal element; so does the per-layer path
        is_max = flat.abs() == absmax.index_select(0, seg)
        candidates = torch.where(is_max, layout.positions, n)
        first = torch.full_like(absmax, n, dtype=torch.int64)
        first.scatter_reduce_(0, seg, candidates, "amin", include_self=True)
        sign = torch.where(flat.index_select(0, first) >= 0, 1.0, -1.0).to(grad.dtype)
        grad_w = grad.clone().index_add_(0, first, grad_absmax * sign)
        return grad_w, None


def fake_quant_segments(weights: list[torch.Tensor], layout: SegmentLayout) -> list[torch.Tensor]:
    """Every weight fake-quantized (one autograd node over the lot), each in its own shape."""
    flat = torch.cat([w.reshape(-1) for w in weights])
    out = _SegmentedMaxAbsFakeQuant.apply(flat, layout)
    return [part.view(shape) for part, shape in zip(out.split(list(layout.numels)), layout.shapes)]
