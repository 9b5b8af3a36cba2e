"""Quantization Correction (Gupta & Asthana, Sec. 4.2): insert, train, fold.

After QAT, each quantized conv that feeds a BatchNorm gets a per-output-channel affine map
``h' = gamma * h + beta`` (gamma = 1, beta = 0 at start).  Everything else is frozen (BN in
eval mode); gamma and beta are trained with Adam on the calibration split with the ordinary
detection loss, then folded into the BN so the deployed graph has no extra op and the
integer weights are untouched.

Convs without a BN after them (the detect heads' final 1x1 output convs: box and class logits)
are corrected too (``head=True``), but cannot be folded into a BN.  Folding them into the
fake-quant weights is not exact either: a max-abs or learned scale is a function of the weights
or a per-tensor parameter, so ``gamma * w`` could move integers across a rounding boundary, and a
per-channel gamma does not fit a per-tensor scale.  So their :class:`CorrectedConv` stays in the
fake-quant model (checkpoints record which convs are wrapped) and is folded where the scale is
explicit: at export, ``gamma * s`` becomes the per-channel dequantization scale and
``gamma * b + beta`` the bias (:func:`fold_affine_into_scale`), the integers untouched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from brevitas.nn import QuantConv2d
from torch import nn

from yoloqat.quant.convert import constant_quant_weights


class ChannelAffine(nn.Module):
    """gamma * x + beta, one pair per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


class CorrectedConv(nn.Module):
    """A quantized conv followed by its correction; removed again by :func:`fold_qc_into_bn`."""

    def __init__(self, conv: QuantConv2d) -> None:
        super().__init__()
        self.conv = conv
        self.correction = ChannelAffine(conv.out_channels).to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.correction(self.conv(x))


def _conv_bn_pairs(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Ultralytics ``Conv`` blocks (conv -> bn -> act) whose conv is quantized."""
    for name, m in model.named_modules():
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, (QuantConv2d, CorrectedConv)):
            yield name, m


def bare_quant_convs(model: nn.Module) -> list[str]:
    """Quantized convs with no BN after them (in YOLOv10: the detect heads' output convs)."""
    fed = {id(block.conv) for _, block in _conv_bn_pairs(model)}
    wrapped = {id(m.conv) for m in model.modules() if isinstance(m, CorrectedConv)}
    return [
        n for n, m in model.named_modules()
        if isinstance(m, QuantConv2d) and id(m) not in fed and id(m) not in wrapped
    ]


def wrap_convs(model: nn.Module, names: list[str]) -> list[ChannelAffine]:
    """Replace each named quantized conv by a :class:`CorrectedConv` around it."""
    added = []
    for name in names:
        conv = model.get_submodule(name)
        if not isinstance(conv, QuantConv2d):
            raise TypeError(f"{name} is not a quantized conv ({type(conv).__name__})")
        wrapped = CorrectedConv(conv)
        model.set_submodule(name, wrapped)
        added.append(wrapped.correction)
    return added


def insert_correction(model: nn.Module, head: bool = False) -> list[ChannelAffine]:
    """Wrap every quantized conv that feeds a BN, and with ``head`` every other quantized conv
    too (the head's output convs); returns the new affine modules."""
    heads = bare_quant_convs(model) if head else []
    added = []
    for _, block in _conv_bn_pairs(model):
        if isinstance(block.conv, QuantConv2d):
            block.conv = CorrectedConv(block.conv)
            added.append(block.conv.correction)
    return added + wrap_convs(model, heads)


def remove_correction(model: nn.Module) -> int:
    """Undo :func:`insert_correction` without folding: every :class:`CorrectedConv` is replaced
    by the conv it wraps (a scratch copy goes back to its model's structure); returns how many."""
    removed = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, CorrectedConv):
            model.set_submodule(name, m.conv)
            removed += 1
    return removed


def corrected_convs(model: nn.Module) -> list[str]:
    """Module paths of every :class:`CorrectedConv` (after :func:`fold_qc_into_bn`: the head's)."""
    return [n for n, m in model.named_modules() if isinstance(m, CorrectedConv)]


def fold_affine_into_scale(
    scale: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma * (s * W_int x + b) + beta == (gamma * s) * W_int x + (gamma * b + beta).

    Per output channel; the integers are untouched (a negative gamma gives a negative scale,
    which the export fold turns into negated integers and a positive scale).
    """
    return scale * gamma, gamma * bias + beta


def correction_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ChannelAffine) for p in m.parameters()]


def freeze_for_correction(model: nn.Module) -> list[nn.Parameter]:
    """Only gamma/beta train; train mode for the head's raw outputs, BN frozen in eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = correction_parameters(model)
    for p in params:
        p.requires_grad_(True)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return params


@torch.no_grad()
def fold_affine_into_bn(bn: nn.BatchNorm2d, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """BN(gamma*y + beta) as one BN with the same running mean and variance.

    With BN(y) = g (y - mu) / sigma + b:  g' = g * gamma,  b' = b + g (beta - mu + gamma mu) / sigma.
    """
    sigma = torch.sqrt(bn.running_var + bn.eps)
    g = bn.weight if bn.affine else torch.ones_like(sigma)
    b = bn.bias if bn.affine else torch.zeros_like(sigma)
    new_b = b + g * (beta - bn.running_mean + gamma * bn.running_mean) / sigma
    new_g = g * gamma
    if bn.affine:
        bn.weight.copy_(new_g)
        bn.bias.copy_(new_b)
    else:  # pragma: no cover - Ultralytics BNs are affine
        raise ValueError("cannot fold a correction into a BatchNorm without affine parameters")


def fold_qc_into_bn(model: nn.Module) -> int:
    """Fold every correction into its BN and unwrap the conv; returns how many were folded."""
    n = 0
    for _, block in list(_conv_bn_pairs(model)):
        if isinstance(block.conv, CorrectedConv):
            aff = block.conv.correction
            fold_affine_into_bn(block.bn, aff.gamma.detach(), aff.beta.detach())
            block.conv = block.conv.conv
            n += 1
    return n


@dataclass
class CorrectionStats:
    layers: int
    steps: int
    gamma_mean_abs_change: float
    gamma_max_abs_change: float
    beta_mean_abs: float
    beta_max_abs: float
    final_loss: float | None


def correction_stats(model: nn.Module, steps: int, final_loss: float | None) -> CorrectionStats:
    affs = [m for m in model.modules() if isinstance(m, ChannelAffine)]
    if not affs:
        return CorrectionStats(0, steps, 0.0, 0.0, 0.0, 0.0, final_loss)
    g = torch.cat([a.gamma.detach().flatten() for a in affs]) - 1.0
    b = torch.cat([a.beta.detach().flatten() for a in affs])
    return CorrectionStats(
        layers=len(affs), steps=steps,
        gamma_mean_abs_change=float(g.abs().mean()), gamma_max_abs_change=float(g.abs().max()),
        beta_mean_abs=float(b.abs().mean()), beta_max_abs=float(b.abs().max()),
        final_loss=final_loss,
    )


def correction_steps(epochs: int, min_steps: int, batches_per_epoch: int) -> int:
    """Adam steps of one correction: ``epochs`` passes over the calibration batches, at least
    ``min_steps`` (a few passes over a small calibration set would barely move gamma/beta)."""
    return max(epochs * batches_per_epoch, min_steps)


def train_correction(
    model: nn.Module, batches: Any, lr: float, steps: int, device: torch.device
) -> tuple[int, float | None]:
    """Adam on gamma/beta only, ``steps`` optimizer steps cycling over ``batches``.

    ``batches`` is an iterable of Ultralytics detection batches (dicts with img, cls, bboxes,
    batch_idx); re-iterated as often as needed.
    """
    params = freeze_for_correction(model)
    # the multi-tensor update (PyTorch's default on accelerators only): on CPU the per-tensor
    # loop over ~200 small gamma/beta tensors cost more than the update; same arithmetic
    opt = torch.optim.Adam(params, lr=lr, foreach=True)
    done, last = 0, None
    # weights and scales are frozen: quantize them once, not on every forward
    with constant_quant_weights(model):
        while done < steps:
            for batch in batches:
                batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                batch["img"] = batch["img"].float() / 255
                loss, _ = model.loss(batch)
                loss = loss.sum()
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite loss while training the correction")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                last = float(loss.detach())
                if done >= steps:
                    break
    model.eval()
    return done, last
