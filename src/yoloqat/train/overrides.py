"""The Ultralytics trainer arguments of this project, shared by the FP and QAT trainers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from yoloqat.config import AUTO, Config
from yoloqat.config_checks import parse_device
from yoloqat.errors import DataError
from yoloqat.paths import DATASET_YAML

MODEL_YAML = {"yolo10n": "yolov10n.yaml", "yolo10s": "yolov10s.yaml", "yolo10m": "yolov10m.yaml"}


def require_dataset(path: Path = DATASET_YAML) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage first (dvc repro prepare)")
    return path


def device_is_cuda(device: str) -> bool:
    """``device`` as params.yaml gives it (``cpu``, ``0``, ``0,1``, ``cuda:0``) names a CUDA device."""
    parsed = parse_device(device)
    return parsed is not None and parsed[0] == "cuda"


AUTO_WORKERS_MAX = 8


def resolve_workers(workers: int | str, device: str, cpu_count: int | None = None) -> int:
    """``fp.workers`` / ``qat.workers`` as a number.  ``auto``: ``min(8, cores)`` on CUDA, where
    decoding and augmenting images on the main thread would starve the GPU; 0 on CPU, where
    Ultralytics forces 0 anyway (the model, not the loader, is the bottleneck there)."""
    if workers != AUTO:
        return int(workers)
    if not device_is_cuda(device):
        return 0
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return min(AUTO_WORKERS_MAX, cores)


def ultralytics_overrides(
    cfg: Config, *, model: str, epochs: int, batch: int, optimizer: str, lr0: float,
    weight_decay: float, warmup_epochs: float, workers: int | str, project: str, name: str,
    amp: bool = False, patience: int = 100, lrf: float = 0.01, momentum: float = 0.937,
    mosaic: float = 0.0, close_mosaic: int = 0, seed: int | None = None, nbs: int | None = None,
) -> dict[str, Any]:
    """The Ultralytics args shared by the FP and QAT trainers (augmentation kept identical).
    ``seed``: None = the run's ``seed`` (train_fp passes the FP seed)."""
    return {
        "model": model,
        "data": str(require_dataset().resolve()),
        "epochs": epochs,
        "imgsz": cfg.data.imgsz,
        "batch": batch,
        # Ultralytics accumulates gradients up to a nominal batch of 64; on a few hundred
        # images that leaves a handful of optimizer steps per epoch.  One step per batch unless
        # qat.nbs asks for accumulation (the reference recipe: 64).
        "nbs": batch if nbs is None else nbs,
        "device": cfg.device,
        "workers": resolve_workers(workers, cfg.device),
        "seed": cfg.seed if seed is None else seed,
        "deterministic": cfg.deterministic,
        "optimizer": optimizer,
        "lr0": lr0,
        "lrf": lrf,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "patience": patience,
        # On CUDA the trainer subclass decides AMP without Ultralytics' downloading check
        # (trainer.offline_amp_check); on CPU Ultralytics never autocasts.
        "amp": amp,
        "plots": False,  # plotting fetches a font from the network
        # Validate YOLOv10's one-to-one (end-to-end, NMS-free) head: the head that is exported.
        "nms": False,
        "val": True,
        "project": project,
        "name": name,
        "exist_ok": True,
        "verbose": True,
        # Off by default (FP always): on short runs with small images mosaic shrinks objects to
        # a few pixels.  QAT can turn it on (qat.mosaic) to follow the reference recipe.
        "mosaic": mosaic,
        "close_mosaic": close_mosaic,
        # "disk": the trainer keeps the .npy files in the project's state folder, not next to
        # the images (data/prepared is a DVC output and must not change).
        "cache": cfg.cache,
    }


ULTRALYTICS_FILES = ("results.csv", "args.yaml")
KEPT_RUN_DIR = "ultralytics"  # results/<stage>/ultralytics/{results.csv,args.yaml}


def keep_run_files(save_dir: Path, results_dir: Path) -> list[Path]:
    """Copy Ultralytics' own per-epoch ``results.csv`` and ``args.yaml`` out of the temporary run
    folder into ``results_dir/ultralytics`` (small, versioned), where Ultralytics users look."""
    import shutil

    dest = Path(results_dir) / KEPT_RUN_DIR
    kept = []
    for name in ULTRALYTICS_FILES:
        src = Path(save_dir) / name
        if src.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            kept.append(Path(shutil.copy2(src, dest / name)))
    return kept


def qat_schedule(cfg: Config) -> dict[str, Any]:
    """QAT's optimizer and augmentation arguments, shared by the qat stage and FP continued (the
    equal-training control must see the same schedule)."""
    q = cfg.qat
    return {
        "epochs": q.epochs, "batch": q.batch, "optimizer": q.optimizer, "lr0": q.lr0, "lrf": q.lrf,
        "momentum": q.momentum, "weight_decay": q.weight_decay, "warmup_epochs": q.warmup_epochs,
        "mosaic": q.mosaic, "close_mosaic": q.close_mosaic, "workers": q.workers,
        "amp": q.amp,  # equal training: QAT's precision too
        "nbs": q.nbs,
    }
