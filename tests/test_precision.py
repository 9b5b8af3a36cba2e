"""exact_float32: TF32 off inside the block, the caller's settings back after, even on error."""

from __future__ import annotations

import pytest
import torch

from yoloqat.quant.precision import exact_float32


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def set_tf32_flags(conv: bool, matmul: bool) -> None:
    # torch's cuBLAS flag module is not monkeypatch-able (a __getattr__ proxy): set directly
    torch.backends.cudnn.allow_tf32 = conv
    torch.backends.cuda.matmul.allow_tf32 = matmul


@pytest.fixture
def keep_tf32_flags():
    saved = tf32_flags()
    yield
    set_tf32_flags(*saved)


@pytest.mark.parametrize("before", [(True, True), (False, True), (True, False)])
def test_exact_float32_turns_tf32_off_and_restores_the_callers_flags(before, keep_tf32_flags):
    set_tf32_flags(*before)
    with pytest.raises(RuntimeError, match="inside"), exact_float32():
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        raise RuntimeError("inside")
    assert tf32_flags() == before
