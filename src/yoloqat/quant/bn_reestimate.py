"""BatchNorm re-estimation (Nagel et al. 2022, Sec. 4.2): running statistics of the network that exists.

Oscillating weights make each BN's running mean and variance an average over many slightly
different networks (the integer weights of every recent step), not the statistics of the weights
being evaluated.  Re-estimation resets the running statistics and recomputes them on a few
training batches, in train mode, without gradients, with ``momentum=None``: a cumulative average
over the batches (each batch's mean, and its unbiased variance, weighted equally), not an EMA.
Weights and BN affine parameters are never touched.

:func:`bn_state` / :func:`load_bn_state` snapshot and restore exactly the buffers re-estimation
changes, so a caller can evaluate a re-estimated model and put the original statistics back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: Iterable[torch.Tensor], num_batches: int) -> int:
    """Recompute every BN's running statistics on up to ``num_batches`` image batches.

    ``images`` yields model inputs (already on the model's device and dtype).  The model's
    train/eval flags and the BN momenta are restored afterwards.  Returns the batches used;
    if ``images`` yields nothing the statistics are left as they were.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    bns = batchnorms(model)
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for _, bn in bns]
    saved = bn_state(model)
    for _, bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches
    used = 0
    try:
        model.train()
        for x in images:
            model(x)
            used += 1
            if used >= num_batches:
                break
    finally:
        for (_, bn), momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        for m, training in modes.items():
            m.training = training
    if used == 0:
        load_bn_state(model, saved)
    return used


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every BN's running statistics, keyed by module path and buffer name."""
    return {
        f"{name}.{key}": getattr(bn, key).detach().clone()
        for name, bn in batchnorms(model)
        for key in BN_BUFFERS
    }


@torch.no_grad()
def load_bn_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back statistics from :func:`bn_state` (exactly, in place)."""
    for name, bn in batchnorms(model):
        for key in BN_BUFFERS:
            getattr(bn, key).copy_(state[f"{name}.{key}"])
