"""What the trainers change in Ultralytics' set-up: its AMP check never downloads, and
``cache: disk`` never writes into a DVC output.

Kept apart from train/trainer.py, which holds the trainers themselves; both stay importable on
their own (Ultralytics' DDP workers re-import the trainer module).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

# GPUs Ultralytics' own check_amp refuses AMP on (ultralytics/utils/checks.py, 8.4): fp16 on
# them gives NaN losses or zero mAP.  Kept here because the check itself cannot run offline.
AMP_UNSAFE_GPU = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)",
    re.IGNORECASE,
)


def offline_check_amp(model: nn.Module) -> bool:
    """Stand-in for Ultralytics' ``check_amp`` that never loads or downloads anything.

    Ultralytics' check compares fp32 and fp16 detections of ``yolo26n.pt``, downloading it when
    missing; this project never downloads.  AMP is granted on CUDA unless the GPU is one that
    Ultralytics refuses by name; the fp32-vs-fp16 comparison is skipped, so a run with AMP
    watches its own losses (a non-finite loss stops it as ``diverged``).
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    gpu = torch.cuda.get_device_name(device)
    if AMP_UNSAFE_GPU.search(gpu):
        print(f"amp: off on {gpu} (Ultralytics lists it as unsafe for fp16 training)")
        return False
    print(
        f"amp: fp16 autocast + GradScaler on {gpu} (Ultralytics' yolo26n.pt check skipped: offline)"
    )
    return True


@contextmanager
def offline_amp_check() -> Iterator[None]:
    """While Ultralytics sets up training, its trainer module's ``check_amp`` is
    :func:`offline_check_amp`.  Ultralytics imports the name into ``ultralytics.engine.trainer``
    and calls it from ``_setup_train``; replacing that one binding bypasses the download without
    copying Ultralytics' set-up code.  Restored afterwards, whatever happens."""
    import ultralytics.engine.trainer as engine

    original = engine.check_amp
    engine.check_amp = offline_check_amp
    try:
        yield
    finally:
        engine.check_amp = original


def disk_cache_dir() -> Path:
    """Where ``cache: disk`` keeps its ``.npy`` images: the project's state folder.  Ultralytics
    would write them next to the images, inside ``data/prepared`` (a DVC output), and later
    runs read any ``.npy`` there even with the cache off."""
    from yoloqat.offline import project_state_dir

    return project_state_dir() / "image_cache"


def redirect_disk_cache(dataset: Any, folder: Path) -> None:
    """Point an Ultralytics dataset's ``.npy`` cache at ``folder`` (one file per image path,
    named by its hash) and fill it.  Ultralytics' own staleness rule (the .npy older than the
    image is rewritten) still applies."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset.npy_files = [
        folder / (hashlib.sha1(str(Path(f).resolve()).encode()).hexdigest() + ".npy")
        for f in dataset.im_files
    ]
    dataset.cache = "disk"
    dataset.cache_images()
