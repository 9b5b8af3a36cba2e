"""Shared test set-up: offline Ultralytics in a throwaway settings folder, DVCLive test mode."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="yoloqat-tests-"))
os.environ.setdefault("YOLOQAT_STATE_DIR", str(_STATE))
os.environ.setdefault("YOLO_CONFIG_DIR", str(_STATE / "ultralytics"))
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_AUTOINSTALL"] = "false"
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests run only where torch sees a CUDA device (`make gpu-check`'s
    machine); everywhere else they are skipped with the reason."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core CPU: one intra-op thread avoids spin-waiting contention
    (measured: the export/evaluate tests ran several-fold faster when other jobs held the cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
