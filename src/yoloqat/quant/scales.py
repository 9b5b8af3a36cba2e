"""Learned quantizer scales: which parameters they are, and LSQ's gradient scale.

With ``scaling: learned`` each QuantConv2d owns a trainable Brevitas parameter
(``weight_quant.tensor_quant.scaling_impl.value``, the clipping threshold ``s * int_max``).  Two
things differ from an ordinary weight:

* weight decay would pull the scale towards 0, i.e. shrink the grid and clip more weights, so
  the trainer puts the scales in a parameter group without decay;
* LSQ (Esser et al., ICLR 2020) multiplies the scale's gradient by ``g = 1 / sqrt(N * Q_P)``
  (N weights quantized with one scale value, Q_P the largest integer) so that the scale's
  update is not much larger than the weights' relative to its size.  Here N is the number of
  weights per scale value: per output channel for per-channel scales, the whole tensor for a
  per-tensor scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from yoloqat.quant.convert import quant_convs, weight_int_max


def scale_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """``(name, quant conv, parameter)`` of every trainable parameter of a weight quantizer."""
    for name, q in quant_convs(model):
        for pname, p in q.weight_quant.named_parameters():
            if p.requires_grad:
                yield f"{name}.weight_quant.{pname}", q, p


def lsq_grad_scale(weights_per_scale: int, int_max: int) -> float:
    """LSQ's ``1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(weights_per_scale * int_max)


def register_lsq_grad_scale(model: nn.Module) -> dict[str, float]:
    """Multiply every learned scale's gradient by its LSQ factor; returns {name: factor}.

    A tensor hook scales the gradient as it arrives, before any optimizer (or gradient
    clipping) sees it.
    """
    factors = {}
    for name, q, p in scale_parameters(model):
        per_scale = q.weight.numel() // max(p.numel(), 1)
        g = lsq_grad_scale(per_scale, weight_int_max(q))
        p.register_hook(_Scaled(g))
        factors[name] = g
    return factors


class _Scaled:
    """A picklable gradient hook (a lambda would not survive ``copy.deepcopy`` of the model)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.factor


@torch.no_grad()
def scale_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every learned scale, by name (empty for max-abs scaling)."""
    return {name: p.detach().clone() for name, _, p in scale_parameters(model)}


@torch.no_grad()
def scale_ratios(model: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|s| / |s_initial|`` (float64, flat) of every learned scale named in ``initial``, by the
    name of its quantized conv (one value per tensor or per channel).  Matched by name, trainable
    or not: an EMA copy's parameters do not require gradients."""
    out: dict[str, torch.Tensor] = {}
    for conv, q in quant_convs(model):
        parts = [
            p.detach().abs().double() / initial[key].abs().double().clamp_min(1e-30)
            for pname, p in q.weight_quant.named_parameters()
            if (key := f"{conv}.weight_quant.{pname}") in initial
        ]
        if parts:
            out[conv] = torch.cat([r.reshape(-1) for r in parts])
    return out


@torch.no_grad()
def scale_ratio_stats(model: nn.Module, initial: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far the learned scales moved from ``initial``: geometric mean and minimum of
    ``|s| / |s_initial|`` over every scale value (``scale/ratio_geomean``, ``scale/ratio_min``).

    Why it is logged: before a BatchNorm the loss is blind to a conv's output scale, so nothing
    but weight decay moves a per-tensor learned scale's magnitude; a steady fall of the geometric
    mean is that decay at work (reports/README.md, "Looking for the collapse").
    """
    ratios = list(scale_ratios(model, initial).values())
    if not ratios:
        return {}
    flat = torch.cat(ratios).clamp_min(1e-300).log()
    return {"scale/ratio_geomean": float(flat.mean().exp()), "scale/ratio_min": float(flat.min().exp())}
