"""Random state kept out of side measurements: a block that draws numbers leaves training's draws as they were."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving Python's, NumPy's or torch's (CPU and CUDA) random state."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (inside :func:`preserved_rng`, for a draw that is the same
    every time without touching the caller's streams)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
