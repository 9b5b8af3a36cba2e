"""The collapse's mechanism, measured: BN statistics mismatch, learned-scale shrink, clipping.

Three quantities the README's reading of the collapse ("the failure is in the BN running
statistics") rests on, measured on a model and a fixed set of images instead of inferred from
which repair works:

* **BN mismatch.**  The model runs in eval mode (every BN normalizes with its running statistics,
  as at validation, and none is updated) while a forward hook records each BN's *input*
  statistics over all the images: per channel the mean and the biased variance, which is what
  the BN would normalize with in train mode.  Per BN layer, averaged over its channels:
  ``logvar = |log((running_var + eps) / (batch_var + eps))|`` and
  ``mean_shift = |running_mean - batch_mean| / sqrt(batch_var + eps)``, with the BN's own
  ``eps`` because ``var + eps`` is what it divides by (a channel whose variance is far below
  eps is normalized by eps whatever its statistics say).  Each BN sees the input the deployed
  network gives it, so upstream mismatches propagate into it, as they do at validation.
* **Weights.**  Per quantized conv: the learned scale over its value at the start of QAT
  (``|s| / |s_0|``, every scale value: one per tensor or per channel), and the fraction of
  weights the quantizer's clamp moves: ``|round(w / s)| > int_max``, ``s`` being the scale
  that sets the integers (:func:`~yoloqat.quant.convert.weight_scale`: for Brevitas' decoupled
  quantizer its AbsMaxL2 pre-scale, the RMS of the channel maxes, which clips every channel whose
  max is above it).
* **BN variance floor.**  The smallest running variance in the network and how many channels
  are below float16's smallest normal number (they underflow to subnormals under fp16 AMP).
* **Outputs.**  What YOLOv10's end-to-end (one-to-one) head puts out on the same images, decoded
  as Ultralytics' validator decodes it with ``nms=False`` (the head's ``postprocess``: the
  ``max_det`` highest class confidences over anchors x classes, ``x1, y1, x2, y2, score, class``
  rows in input pixels, best first), before the validator keeps the rows with a confidence
  above its threshold: so a curve at mAP 0 can be told apart as "no confident prediction",
  "confident but misplaced boxes" or "non-finite output".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from yoloqat.quant.bn_reestimate import batchnorms
from yoloqat.quant.convert import quant_convs, weight_int_max, weight_scale
from yoloqat.quant.scales import scale_ratios

FP16_TINY = float(torch.finfo(torch.float16).tiny)
# Ultralytics' confidence thresholds: validation (args.conf unset) and prediction defaults
VAL_CONF, PREDICT_CONF = 0.001, 0.25


@dataclass(frozen=True)
class BNMismatch:
    """One BN layer's mismatch, each averaged over its channels."""

    name: str
    logvar: float  # |log((running_var + eps) / (batch_var + eps))|
    mean_shift: float  # |running_mean - batch_mean| / sqrt(batch_var + eps)


@dataclass(frozen=True)
class QuantLayerStats:
    name: str
    clipped: float  # fraction of weights whose integer the clamp moves
    scale_ratio_median: (
        float | None
    )  # of |s| / |s_0| over the layer's scale values; None: no learned scale
    scale_ratio_min: float | None


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et
    al.'s parallel formula, in float64) so that many batches give the statistics of all of them."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().double().transpose(0, 1).reshape(x.shape[1], -1)  # (channels, values)
        n = flat.shape[1]
        mean = flat.mean(dim=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> torch.Tensor:
        assert self.m2 is not None
        return self.m2 / self.count  # biased: what BN normalizes with in train mode


@torch.no_grad()
def bn_mismatch(model: nn.Module, images: Iterable[torch.Tensor]) -> list[BNMismatch]:
    """Every BN layer's mismatch between its running statistics and its input's statistics over
    ``images`` (model inputs, on the model's device).  The model runs in eval mode; its
    train/eval flags are restored and its hooks removed afterwards; nothing else changes.  A BN
    no image reached is left out."""
    bns = batchnorms(model)
    moments = {name: _Moments() for name, _ in bns}
    modes = {m: m.training for m in model.modules()}
    handles = [bn.register_forward_hook(_recorder(moments[name])) for name, bn in bns]
    try:
        model.eval()
        for x in images:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    out = []
    for name, bn in bns:
        mom = moments[name]
        if mom.mean is None:
            continue
        eps = float(bn.eps)
        batch_var = mom.var + eps
        running_var = bn.running_var.detach().double() + eps
        logvar = (running_var / batch_var).log().abs().mean()
        shift = ((bn.running_mean.detach().double() - mom.mean).abs() / batch_var.sqrt()).mean()
        out.append(BNMismatch(name=name, logvar=float(logvar), mean_shift=float(shift)))
    return out


def _recorder(moments: _Moments):
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        moments.add(args[0])

    return hook


@torch.no_grad()
def weight_mechanism(
    model: nn.Module,
    initial_scales: dict[str, torch.Tensor],
) -> tuple[list[QuantLayerStats], dict[str, float]]:
    """Every quantized conv's clipped fraction and learned-scale ratio, and their summary:
    ``clipped_mean`` / ``clipped_max`` over layers, ``scale_ratio_median`` (the lower median) /
    ``scale_ratio_min`` over every learned scale value of the network.  A plain model gives
    ``([], {})``; without learned scales (max-abs, or an empty ``initial_scales``: the
    :func:`yoloqat.quant.scales.scale_snapshot` at the start of training) the ratios are absent."""
    ratios = scale_ratios(model, initial_scales)
    layers = []
    for name, q in quant_convs(model):
        integers = torch.round(q.weight.detach().float() / weight_scale(q).float())
        r = ratios.get(name)
        layers.append(
            QuantLayerStats(
                name=name,
                clipped=float((integers.abs() > weight_int_max(q)).double().mean()),
                scale_ratio_median=None if r is None else float(r.median()),
                scale_ratio_min=None if r is None else float(r.min()),
            )
        )
    summary: dict[str, float] = {}
    if layers:
        clipped = [layer.clipped for layer in layers]
        summary["clipped_mean"] = math.fsum(clipped) / len(clipped)
        summary["clipped_max"] = max(clipped)
    if ratios:
        flat = torch.cat(list(ratios.values()))
        summary["scale_ratio_median"] = float(flat.median())
        summary["scale_ratio_min"] = float(flat.min())
    return layers, summary


@torch.no_grad()
def bn_variance_floor(model: nn.Module) -> dict[str, float]:
    """``bn_var_min`` (the smallest BN running variance) and ``bn_var_below_fp16`` (how many BN
    channels' running variance is below float16's smallest normal number); {} without BNs."""
    variances = [bn.running_var.detach().double().reshape(-1) for _, bn in batchnorms(model)]
    if not variances:
        return {}
    flat = torch.cat(variances)
    return {"bn_var_min": float(flat.min()), "bn_var_below_fp16": float((flat < FP16_TINY).sum())}


def mismatch_summary(layers: list[BNMismatch]) -> tuple[dict[str, float], dict[str, str]]:
    """``({bn_logvar_mean, bn_logvar_worst, bn_mean_shift_mean, bn_mean_shift_worst}, {the worst
    layers' names})``: means over layers and the largest layer value."""
    if not layers:
        return {}, {}
    values: dict[str, float] = {}
    worst: dict[str, str] = {}
    for key, get in (("bn_logvar", lambda b: b.logvar), ("bn_mean_shift", lambda b: b.mean_shift)):
        per_layer = [get(b) for b in layers]
        top = max(range(len(layers)), key=lambda i: _order(per_layer[i]))
        values[f"{key}_mean"] = math.fsum(per_layer) / len(per_layer)
        values[f"{key}_worst"] = per_layer[top]
        worst[f"{key}_worst_layer"] = layers[top].name
    return values, worst


def _order(value: float) -> float:
    return math.inf if math.isnan(value) else value  # a NaN layer is the worst there is


# --------------------------------------------------------------------------------------------
# outputs


def detection_statistics(detections: torch.Tensor) -> dict[str, float]:
    """Per-image statistics of end-to-end detections ``(images, k, 6)`` (rows ``x1, y1, x2, y2,
    score, class``, what the head's ``postprocess`` returns), averaged over the images:

    * ``out_score_max_mean``: the highest score of the image (the best class confidence of any
      anchor), mean over images;
    * ``out_above_001`` / ``out_above_025``: how many rows have a score above 0.001 (the
      validator's threshold, ``score > conf`` as its filter keeps them) / above 0.25, mean over
      images; at most ``k`` (the head's ``max_det``, clamped to the anchor count);
    * ``out_box_wh_median``: the lower median over images of sqrt(w * h) of the image's
      highest-scoring box (the side of a square of its area, input pixels; 0 for an empty box).

    A NaN score makes its image's maximum NaN (and the mean); ``out_nonfinite`` counts it."""
    scores = detections[..., 4]
    top = scores.argmax(dim=1, keepdim=True)  # the first of ties, as postprocess orders rows
    box = detections[..., :4].double().gather(1, top[..., None].expand(-1, -1, 4))[:, 0]
    side = ((box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0)).sqrt()

    def above(conf: float) -> float:
        # in the scores' own dtype, as the validator compares: a float32 score of 0.001 is not kept
        return float((scores > conf).sum(dim=1).double().mean())

    return {
        "out_score_max_mean": float(scores.double().max(dim=1).values.mean()),
        "out_above_001": above(VAL_CONF),
        "out_above_025": above(PREDICT_CONF),
        "out_box_wh_median": float(side.median()),
    }


@dataclass
class HeadOutputs:
    """The end-to-end head's outputs over several batches: the decoded detections, kept (a few kB
    per image), and the raw one-to-one tensors' finite/non-finite counts."""

    detections: list[torch.Tensor] = field(default_factory=list)
    nonfinite: int = 0
    values: int = 0

    def add(self, detections: torch.Tensor, raw: Sequence[torch.Tensor]) -> None:
        self.detections.append(detections.detach().cpu())
        for t in raw:
            self.nonfinite += int((~torch.isfinite(t)).sum())
            self.values += t.numel()

    def summary(self) -> dict[str, float]:
        """:func:`detection_statistics` over every image, and ``out_nonfinite``: the fraction
        of non-finite values of the raw one-to-one box and class tensors (before the sigmoid,
        which would map an infinite logit to a finite score).  {} when nothing was recorded."""
        if not self.detections:
            return {}
        values = detection_statistics(torch.cat(self.detections))
        values["out_nonfinite"] = self.nonfinite / self.values if self.values else 0.0
        return values


def end2end_head(model: nn.Module) -> nn.Module | None:
    """The last Ultralytics detection head of ``model`` with a one-to-one branch (YOLOv10's
    ``v10Detect``), or None."""
    heads = [
        m
        for m in model.modules()
        if getattr(m, "one2one_cv2", None) is not None and hasattr(m, "postprocess")
    ]
    return heads[-1] if heads else None


_UNSET = object()


@contextmanager
def recording_outputs(model: nn.Module) -> Iterator[HeadOutputs | None]:
    """Inside the block every eval-mode forward of ``model`` records its end-to-end head's
    output into the yielded :class:`HeadOutputs` (None: no one-to-one head, nothing recorded).

    The head decodes its one-to-one branch inside the block (``end2end`` on, as the validator sets
    it with ``nms=False``) with its own ``max_det``; what the model returns is unchanged but for
    that choice of branch.  On exit the hook is removed and the head's ``end2end`` choice is put
    back as it was (its anchor cache is recomputed from the feature shapes whenever they change,
    so the values it keeps are the ones any later decode computes)."""
    head = end2end_head(model)
    if head is None:
        yield None
        return
    outputs = HeadOutputs()

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if not isinstance(output, tuple):  # training: the raw dicts; export: no raw tensors
            return
        detections, preds = output
        one2one = preds["one2one"]
        outputs.add(detections, (one2one["boxes"], one2one["scores"]))

    chosen = head.__dict__.get("_end2end", _UNSET)
    handle = head.register_forward_hook(hook)
    try:
        head._end2end = True
        yield outputs
    finally:
        handle.remove()
        if chosen is _UNSET:
            head.__dict__.pop("_end2end", None)
        else:
            head._end2end = chosen
