"""Oscillation dampening (Nagel et al. 2022, Sec. 5.1): pull latent weights to their bin centres.

For one quantized conv, with ``x = w / s`` the latent weights in units of the layer's scale,

    L_damp = sum over weights of (clip(x, -int_max, int_max) - round(clip(x, -int_max, int_max)))^2

and the model's penalty is the sum over every quantized conv.  The rounded target and the scale
are constants (detached): the gradient, ``2 (x - round(x)) / s`` per weight inside the range,
flows only into the latent weights, never through the rounding or into the scale.  Clipping first
(Nagel's ``clip(w, s n, s p)``) leaves a weight beyond the integer range alone: its quantized value
is the range edge whatever it does, so pulling it back would only fight the task loss.

Measured in units of the scale, a weight sitting on a rounding boundary costs 0.25 and one on its
grid point 0, whatever the layer's magnitude; the penalty grows with the number of weights
(yolov10n has about 2.3M quantized weights, so a uniformly spread model costs about N / 12).

Why a cosine ramp: a full-strength penalty from the first step freezes the latent weights where
the float model left them; ramping lambda from 0 lets QAT move weights across bins first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from brevitas.nn import QuantConv2d
from torch import nn

from yoloqat.quant.convert import quant_convs, weight_int_max, weight_scale


def layer_dampening(q: QuantConv2d, int_max: int | None = None) -> torch.Tensor:
    """L_damp of one quantized conv (a 0-d tensor with a gradient into ``q.weight`` only)."""
    limit = float(weight_int_max(q) if int_max is None else int_max)
    x = (q.weight / weight_scale(q)).clamp(-limit, limit)
    return (x - torch.round(x.detach())).square().sum()


def cosine_ramp(step: int, total: int) -> float:
    """0 at step 0, rising along a half cosine to 1 at ``total`` (and 1 after it)."""
    if total <= 0:
        return 1.0
    t = min(max(step, 0), total) / total
    return 0.5 * (1.0 - math.cos(math.pi * t))


class Dampening:
    """``lambda(t) * sum of L_damp`` over a model's quantized convs, with its bookkeeping.

    ``weight`` is lambda; with ``ramp`` it is scaled by :func:`cosine_ramp` of the number of
    training calls so far over ``total_steps``.  Every call (one per training step) returns the
    weighted penalty and advances the step; :meth:`pop_stats` gives the mean unweighted penalty
    since the last pop (``damp/penalty``) and the lambda of the latest call (``damp/lambda``).
    The modules are held by reference: pass the model that is really being optimized.
    """

    def __init__(self, model: nn.Module, weight: float, ramp: bool = False, total_steps: int = 1) -> None:
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"dampening weight must be a finite number >= 0, got {weight}")
        # the bit width is fixed: read it once (a Brevitas quant_weight() call per layer)
        self.layers = [(q, weight_int_max(q)) for _, q in quant_convs(model)]
        self.weight = float(weight)
        self.ramp = bool(ramp)
        self.total_steps = int(total_steps)
        self.steps = 0
        self.last_lambda = 0.0
        self._penalty_sum: torch.Tensor | None = None  # device tensor: no host sync per step
        self._calls = 0

    def lambda_at(self, step: int) -> float:
        return self.weight * (cosine_ramp(step, self.total_steps) if self.ramp else 1.0)

    def penalty(self) -> torch.Tensor:
        """The unweighted sum of L_damp over every layer (differentiable in the weights)."""
        return torch.stack([layer_dampening(q, int_max) for q, int_max in self.layers]).sum()

    def __call__(self) -> torch.Tensor:
        lam = self.lambda_at(self.steps)
        self.steps += 1
        self.last_lambda = lam
        pen = self.penalty()
        detached = pen.detach()
        self._penalty_sum = detached if self._penalty_sum is None else self._penalty_sum + detached
        self._calls += 1
        return lam * pen

    def pop_stats(self) -> dict[str, float]:
        mean = float(self._penalty_sum.item()) / self._calls if self._calls else 0.0
        self._penalty_sum, self._calls = None, 0
        return {"damp/penalty": mean, "damp/lambda": self.last_lambda}


class DampenedCriterion:
    """Ultralytics' detection criterion plus the oscillation dampening penalty.

    Ultralytics' loss is the per-image mean loss times the batch size, so the penalty is added
    as ``batch_size * lambda * L_damp``: lambda keeps its meaning relative to the per-image
    detection loss whatever the batch.  Only training calls (gradients enabled) add it; the
    validator's loss calls (inference mode) get the plain criterion.  Every other attribute
    (E2ELoss' ``update`` and friends) is the wrapped criterion's.
    """

    def __init__(self, base: Any, dampening: Any) -> None:
        self.base = base
        self.dampening = dampening

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        loss, items = self.base(preds, batch)
        if not torch.is_grad_enabled():
            return loss, items
        return loss.sum() + batch["img"].shape[0] * self.dampening(), items

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if base is None:  # during copy/unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(base, name)
