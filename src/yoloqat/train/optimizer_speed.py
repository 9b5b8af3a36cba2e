"""Two ways the optimizer step of Ultralytics' trainer runs faster on CPU with the same
arithmetic (tests/test_trainer.py checks the weights stay bit-identical): the multi-tensor
update, and a parameter list made once for the gradient clipping."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def with_foreach_update(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` set to the multi-tensor update, for its groups and any group added later;
    left as it is where Ultralytics chose the fused kernel (Adam/AdamW on CUDA), which excludes
    ``foreach``."""
    if optimizer.defaults.get("fused"):
        return optimizer
    optimizer.defaults["foreach"] = True
    for group in optimizer.param_groups:
        group["foreach"] = True
    return optimizer


@contextmanager
def listed_parameters(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block ``model.parameters()`` returns ``params`` (``list(model.parameters())``
    made once, so in the same order).  Ultralytics' ``optimizer_step`` clips the gradients over
    ``self.model.parameters()``, which walks every submodule: a Brevitas model's tree is deep
    enough that the walk cost more than the clipping (~30 ms a step on CPU).  The instance
    attribute shadows the method only inside the block."""
    model.parameters = lambda recurse=True: iter(params)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.__dict__["parameters"]
