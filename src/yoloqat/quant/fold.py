"""BatchNorm folding for deployment that keeps the integer grid exact.

Why BatchNorm folding is done by hand and not with Ultralytics' ``fuse()``: a BN layer is an
affine map per output channel, so folding it into a per-channel quantized conv only rescales
each channel -- ``integers * scale * g / sqrt(var + eps)`` -- and the int4 integers stay exactly
what QAT trained.  ``fuse()`` would also re-parameterize ``RepVGGDW`` by adding its 7x7 and
(padded) 3x3 depthwise kernels; the sum of two int4 grids with different scales is not on any
int4 grid, so it would have to be re-quantized.  Here both RepVGGDW branches stay separate int4
convs (the module's own un-fused forward adds their outputs).  A negative BN gain would give a
negative scale; to keep every scale positive (what most int4 runtimes accept) that channel's
integers are negated instead, which is exact on the symmetric grid -7..7.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from yoloqat.errors import ExportError
from yoloqat.quant.convert import float_conv_like, int_weight
from yoloqat.quant.correction import CorrectedConv, fold_affine_into_scale


@dataclass
class FoldedConv:
    """One quantized conv after BN folding: ``weight == integers * scale`` bit for bit."""

    name: str  # module path in the (deploy) model
    integers: np.ndarray  # int8 (out, in/groups, kh, kw), values in [-(2^(b-1)-1), 2^(b-1)-1]
    scale: np.ndarray  # float32 (out,), > 0 (or 0 for a dead channel)
    bits: int
    trained_integers: np.ndarray  # int_weight(q).integers of the fake-quant layer
    sign: np.ndarray  # int8 (out,): integers == trained_integers * sign (per output channel)
    bn_folded: bool

    @property
    def weight(self) -> np.ndarray:
        return self.integers.astype(np.float32) * self.scale.reshape(-1, 1, 1, 1)



def _conv_like(q: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    conv = float_conv_like(q, weight, bias)
    conv.requires_grad_(False)
    return conv


@torch.no_grad()
def _fold_one(
    name: str, q: nn.Module, bn: nn.BatchNorm2d | None, correction: nn.Module | None = None
) -> tuple[nn.Conv2d, FoldedConv]:
    """Fold ``q`` (then its QC ``correction``, then ``bn``, in forward order) onto its integers."""
    iw = int_weight(q)
    out = q.out_channels
    trained = iw.integers.cpu().numpy().astype(np.int8)
    scale = (
        iw.scale.double().cpu().reshape(-1).expand(out)
        if iw.scale.numel() == 1
        else (iw.scale.double().cpu().reshape(out))
    )
    bias = (
        q.bias.detach().double().cpu()
        if q.bias is not None
        else torch.zeros(out, dtype=torch.float64)
    )
    if correction is not None:
        scale, bias = fold_affine_into_scale(
            scale, bias, correction.gamma.detach().double().cpu(), correction.beta.detach().double().cpu()
        )
    if bn is not None:
        gain = bn.weight.detach().double().cpu() / torch.sqrt(
            bn.running_var.double().cpu() + bn.eps
        )
        bias = bn.bias.detach().double().cpu() - bn.running_mean.double().cpu() * gain + bias * gain
        scale = scale * gain
    sign = torch.where(scale < 0, -1, 1).to(torch.int8)
    scale32 = (scale * sign.double()).float().numpy()
    integers = trained * sign.numpy().reshape(-1, 1, 1, 1)
    rec = FoldedConv(
        name=name,
        integers=integers.astype(np.int8),
        scale=scale32,
        bits=iw.bits,
        trained_integers=trained,
        sign=sign.numpy(),
        bn_folded=bn is not None,
    )
    has_bias = bn is not None or correction is not None or q.bias is not None
    conv = _conv_like(q, torch.from_numpy(rec.weight), bias.float() if has_bias else None)
    return conv, rec


def fold_quantized(
    model: nn.Module, inplace: bool = False
) -> tuple[nn.Module, dict[str, FoldedConv]]:
    """A float "deploy" model from a fake-quant one, with BN folded into the integer grid.

    Every quantized conv becomes a plain ``nn.Conv2d`` whose weight is exactly
    ``integers * folded_scale``; ``Conv`` modules drop their BN and use ``forward_fuse``.
    ``RepVGGDW`` is left un-fused (its two branches stay separate int4 convs).  ``inplace``
    converts ``model`` itself (a deep copy of a Brevitas model costs seconds).
    """
    from brevitas.nn import QuantConv2d
    from ultralytics.nn.modules.conv import Conv, Conv2

    deploy = (model if inplace else copy.deepcopy(model)).float().cpu().eval()
    records: dict[str, FoldedConv] = {}
    for name, m in list(deploy.named_modules()):
        if (
            isinstance(m, Conv)
            and not isinstance(m, Conv2)
            and isinstance(getattr(m, "conv", None), (QuantConv2d, CorrectedConv))
            and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)
        ):
            q, corr = (m.conv.conv, m.conv.correction) if isinstance(m.conv, CorrectedConv) else (m.conv, None)
            conv, rec = _fold_one(f"{name}.conv", q, m.bn, corr)
            m.conv = conv
            delattr(m, "bn")
            m.forward = m.forward_fuse  # type: ignore[method-assign]
            records[rec.name] = rec
    inner = {id(m.conv) for m in deploy.modules() if isinstance(m, CorrectedConv)}
    bare = [
        (n, m) for n, m in deploy.named_modules()
        if isinstance(m, (QuantConv2d, CorrectedConv)) and id(m) not in inner  # inner: folded with its wrapper
    ]
    for name, q in bare:
        # Convs without a BN after them (the head's 1x1 output convs): weight = integers * scale,
        # a head correction folded into the scale (gamma * s) and the bias (gamma * b + beta).
        conv, rec = (
            _fold_one(name, q.conv, None, q.correction) if isinstance(q, CorrectedConv) else _fold_one(name, q, None)
        )
        deploy.set_submodule(name, conv)
        records[rec.name] = rec
    leftovers = [
        n for n, m in deploy.named_modules() if isinstance(m, (QuantConv2d, nn.BatchNorm2d))
    ]
    if leftovers:
        raise ExportError(
            f"cannot fold {len(leftovers)} layer(s) into int4 convs"
            f" (first: {leftovers[0]});"
            " only Conv+BN, DWConv+BN and bare quantized convs are supported"
        )
    deploy.__dict__.pop("quant_recipe", None)
    return deploy, records


def fold_float(model: nn.Module) -> nn.Module:
    """The FP baseline: Ultralytics' own Conv+BN fusion (RepVGGDW may merge: it is float)."""
    m = copy.deepcopy(model).float().cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    if getattr(m.model[-1], "one2one_cv2", None) is not None:
        m.end2end = True  # fuse() drops the branch end2end does not select: keep one-to-one
    return m.fuse(verbose=False)
