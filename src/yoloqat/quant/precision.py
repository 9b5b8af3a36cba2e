"""Full float32 arithmetic for the checks that compare two models' outputs to float rounding.

On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32``): a 10-bit mantissa, so two mathematically equal models
differ by ~1e-3 relative, and cuDNN may pick another algorithm for either.  Measured on an
H200: the QC fold check saw 1.4e-3 (its tolerance is 1e-4) and the batched-vs-per-layer
gradient test 1.2e-3 on the first conv.  Training keeps TF32 (it is fast and the checks say
nothing about it); a check that means "equal up to float32 rounding" runs inside this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and matmuls inside the block; both restored after."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv
        torch.backends.cuda.matmul.allow_tf32 = matmul
