"""Oscillation dampening (Nagel et al. 2022, Sec. 5.1): pull latent weights to their bin centres.

For one quantized conv with grid scale ``s`` (per tensor or per output channel) and narrow
integer range ``[-n, n]`` (n = 7 at 4 bits), the paper's loss is in weight units:

    L_damp = sum over weights of (s * round(clip(w / s, -n, n)) - clip(w, -n s, n s))^2

(form ``weight``, the default).  Form ``scale`` is the same per weight divided by ``s^2``, i.e.
``(clip(x) - round(clip(x)))^2`` with ``x = w / s``: every layer then costs the same for the
same position inside its bins whatever its magnitude (a weight on a rounding boundary costs
0.25, one on its grid point 0), while the weight form weights each layer by ``s^2``, as the
paper and its code (``dampening_loss`` in Qualcomm's oscillations-qat) do.

The bin centre ``s * round(clip(w / s))`` and the scale are constants (detached): the gradient,
``2 (clip(w) - centre)`` per weight inside the range (``/ s^2`` in the scale form), flows only
into the latent weights, never through the rounding or into the scale.  Clipping first leaves a
weight beyond the integer range alone: its quantized value is the range edge whatever it does,
so pulling it back would only fight the task loss.

Which grid: the one the forward pass rounds on (:func:`yoloqat.quant.convert.weight_scale`).
For max-abs and learned (LSQ) scales ``s * round(clip(w / s))`` is exactly the fake-quantized
weight the conv uses (tested).  For Brevitas' decoupled quantizer the integers are
``round(clip(w / pre_scale))`` and the forward multiplies them by a separately learned output
scale: the latent weights live on the pre-scale's grid, so that is the grid the loss pulls them
to (integers equal to the forward's, tested), and the learned output scale, which may decay far
from the pre-scale, plays no part.  Per tensor the pre-scale is AbsMaxL2 (the root mean square
of the channels' max |w|, over n), so the weights of the channels above that mean are clipped,
and the loss leaves them alone as above.

Aggregation: the sum over every weight of every quantized conv (the reference code's default
is ``kernel_mean``, the sum over output channels of the mean over the rest, which is smaller by
a factor in_channels x kernel area per layer; lambda values do not transfer between the two).

Why a cosine ramp: a full-strength penalty from the first step freezes the latent weights where
the float model left them; ramping lambda from 0 lets QAT move weights across bins first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from brevitas.nn import QuantConv2d
from torch import nn

from yoloqat.config import DAMPENING_FORMS
from yoloqat.quant.convert import quant_convs, weight_int_max, weight_scale


def bin_centres(q: QuantConv2d, int_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(integers, s)``: ``round(clip(w / s))`` and the grid scale ``s`` of ``q``'s forward,
    both detached (``s`` broadcastable to the weight)."""
    limit = float(weight_int_max(q) if int_max is None else int_max)
    scale = weight_scale(q)
    integers = torch.round((q.weight.detach() / scale).clamp(-limit, limit))
    return integers, scale


def layer_dampening(
    q: QuantConv2d, int_max: int | None = None, form: str = "weight"
) -> torch.Tensor:
    """L_damp of one quantized conv (a 0-d tensor with a gradient into ``q.weight`` only)."""
    if form not in DAMPENING_FORMS:
        raise ValueError(
            f"dampening form {form!r} is not allowed; expected one of {' | '.join(DAMPENING_FORMS)}"
        )
    limit = float(weight_int_max(q) if int_max is None else int_max)
    integers, scale = bin_centres(q, int_max)
    if form == "scale":
        x = (q.weight / scale).clamp(-limit, limit)
        return (x - integers).square().sum()
    clipped = q.weight.clamp(-limit * scale, limit * scale)
    return (clipped - scale * integers).square().sum()


def cosine_ramp(step: int, total: int) -> float:
    """0 at step 0, rising along a half cosine to 1 at ``total`` (and 1 after it)."""
    if total <= 0:
        return 1.0
    t = min(max(step, 0), total) / total
    return 0.5 * (1.0 - math.cos(math.pi * t))


class Dampening:
    """``lambda(t) * sum of L_damp`` over a model's quantized convs, with its bookkeeping.

    ``weight`` is lambda; with ``ramp`` it is scaled by :func:`cosine_ramp` of the number of
    training calls so far over ``total_steps``.  ``form`` is the loss's units
    (:data:`yoloqat.config.DAMPENING_FORMS`).  Every call (one per training step) returns the
    weighted penalty and advances the step; :meth:`pop_stats` gives the mean unweighted penalty
    since the last pop (``damp/penalty``) and the lambda of the latest call (``damp/lambda``).
    The modules are held by reference: pass the model that is really being optimized.
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float,
        ramp: bool = False,
        total_steps: int = 1,
        form: str = "weight",
    ) -> None:
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"dampening weight must be a finite number >= 0, got {weight}")
        if form not in DAMPENING_FORMS:
            raise ValueError(
                f"dampening form {form!r} is not allowed; expected one of {' | '.join(DAMPENING_FORMS)}"
            )
        # the bit width is fixed: read it once (a Brevitas quant_weight() call per layer)
        self.layers = [(q, weight_int_max(q)) for _, q in quant_convs(model)]
        self.weight = float(weight)
        self.ramp = bool(ramp)
        self.total_steps = int(total_steps)
        self.form = form
        self.steps = 0
        self.last_lambda = 0.0
        self._penalty_sum: torch.Tensor | None = None  # device tensor: no host sync per step
        self._calls = 0

    def lambda_at(self, step: int) -> float:
        return self.weight * (cosine_ramp(step, self.total_steps) if self.ramp else 1.0)

    def penalty(self) -> torch.Tensor:
        """The unweighted sum of L_damp over every layer (differentiable in the weights)."""
        return torch.stack(
            [layer_dampening(q, int_max, self.form) for q, int_max in self.layers]
        ).sum()

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
