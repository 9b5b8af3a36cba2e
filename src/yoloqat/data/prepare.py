"""Build the dataset for a params.yaml ``data`` section, atomically.

The dataset folder is a DVC output that every later stage trusts, so it must never be seen
half-written: everything is built in a hidden sibling temp folder and only a complete,
manifested dataset is renamed into place.  Any failure removes the temp folder, leaves an
existing ``out_dir`` exactly as it was, and surfaces as a one-line :class:`DataError`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .coco import convert_coco, merge_skips
from .errors import DataError
from .manifest import copy_calib, train_val_overlap, write_dataset_yaml, write_manifest
from .synthetic import generate_synthetic
from .yolo import import_yolo

DEFAULT_DIFFICULTY = 1.0


def _resolve(root: Path, path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root) / p


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _synthetic(cfg: DataConfig, seed: int, tmp: Path, difficulty: float) -> dict[str, Any]:
    stats = generate_synthetic(
        tmp,
        seed=seed,
        train_images=cfg.train_images,
        val_images=cfg.val_images,
        calib_images=cfg.calib_images,
        imgsz=cfg.imgsz,
        num_classes=cfg.num_classes,
        difficulty=difficulty,
    )
    return {
        "source": "synthetic",
        "seed": seed,
        "params": {
            "train_images": cfg.train_images,
            "val_images": cfg.val_images,
            "calib_images": cfg.calib_images,
            "imgsz": cfg.imgsz,
            "num_classes": cfg.num_classes,
            "difficulty": difficulty,
        },
        "skipped": {},
        "hidden_dropped": {s: v["hidden_dropped"] for s, v in stats["splits"].items()},
        "_origin": "the synthetic generator",
    }


def _coco(cfg: DataConfig, seed: int, tmp: Path, root: Path) -> dict[str, Any]:
    base = _resolve(root, cfg.path or ".")
    runs: list[dict[str, Any]] = []
    category_map: dict[int, int] | None = None
    names: list[str] | None = None
    for split, json_rel, images_rel, limit in (
        ("train", cfg.coco_train_json, cfg.coco_train_images, cfg.train_images),
        ("val", cfg.coco_val_json, cfg.coco_val_images, cfg.val_images),
    ):
        stats = convert_coco(
            base / json_rel,
            base / images_rel,
            tmp,
            split,
            max_images=limit,
            keep_negatives=cfg.keep_negatives,
            seed=seed,
            # None for train: the mapping is defined by the train categories, then reused for
            # val so class indices mean the same thing in both splits.
            category_map=category_map,
            names=names,
        )
        category_map, names = stats["category_map"], stats["names"]
        runs.append(stats)
    write_dataset_yaml(tmp, runs[0]["names"])
    calib = copy_calib(tmp, cfg.calib_images, seed)
    overlap = train_val_overlap(tmp, runs[0]["sources"], runs[1]["sources"])
    return {
        "source": "coco",
        "seed": seed,
        "params": {
            "path": cfg.path,
            "coco_train_json": cfg.coco_train_json,
            "coco_train_images": cfg.coco_train_images,
            "coco_val_json": cfg.coco_val_json,
            "coco_val_images": cfg.coco_val_images,
            "keep_negatives": cfg.keep_negatives,
            "train_images": cfg.train_images,
            "val_images": cfg.val_images,
            "calib_images": cfg.calib_images,
        },
        "skipped": merge_skips(runs),
        "skipped_per_split": {
            "train": runs[0]["skipped"], "val": runs[1]["skipped"],
            "calib": {"capped": cfg.calib_images - calib},
        },
        "train_val_overlap": overlap,
        "_origin": f"COCO {str(base / cfg.coco_train_json)!r} (images {cfg.coco_train_images!r})",
    }


def _yolo(cfg: DataConfig, seed: int, tmp: Path, root: Path) -> dict[str, Any]:
    if not cfg.path:
        raise DataError("data: data.path must name a dataset yaml when data.source=yolo")
    dataset_yaml = _resolve(root, cfg.path)
    stats = import_yolo(
        dataset_yaml, tmp, cfg.train_images, cfg.val_images, cfg.calib_images, seed
    )
    overlap = train_val_overlap(tmp, stats["sources"]["train"], stats["sources"]["val"])
    return {
        "source": "yolo",
        "seed": seed,
        "params": {
            "path": cfg.path,
            "train_images": cfg.train_images,
            "val_images": cfg.val_images,
            "calib_images": cfg.calib_images,
        },
        "skipped": stats["skipped"],
        "skipped_per_split": stats["skipped_per_split"],
        "train_val_overlap": overlap,
        "_origin": f"YOLO dataset {str(dataset_yaml)!r}",
    }


def _check_usable(manifest: dict[str, Any], origin: str) -> None:
    dropped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items() if v)
    why = f" (skipped: {dropped})" if dropped else ""
    for split in ("train", "val"):
        if manifest["splits"][split]["images"] == 0:
            raise DataError(f"data: zero usable {split} images from {origin}{why}")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` with two renames; on failure the old folder is restored."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    had_old = out_dir.exists() or out_dir.is_symlink()
    if had_old:
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if had_old:
            os.replace(old, out_dir)
        raise
    if had_old:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def prepare_dataset(
    cfg: DataConfig,
    seed: int,
    out_dir: Path,
    root: Path,
    *,
    difficulty: float = DEFAULT_DIFFICULTY,
) -> dict[str, Any]:
    """Build the dataset ``cfg`` describes into ``out_dir`` and return its manifest.

    ``root`` is the repo root that ``cfg.path`` is relative to (not the cwd, which differs in
    DVC queue workspaces).  ``difficulty`` only affects the synthetic source.

    Raises :class:`DataError` (one line) on any failure, including zero usable train or val
    images; ``out_dir`` is then untouched and no temp folder is left behind.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own pid's leftover from an interrupted earlier call
    done = False
    try:
        tmp.mkdir()
        if cfg.source == "synthetic":
            info = _synthetic(cfg, seed, tmp, difficulty)
        elif cfg.source == "coco":
            info = _coco(cfg, seed, tmp, Path(root))
        elif cfg.source == "yolo":
            info = _yolo(cfg, seed, tmp, Path(root))
        else:
            raise DataError(f"data: unknown data.source {cfg.source!r}")
        origin = info.pop("_origin")
        manifest = write_manifest(tmp, info)
        _check_usable(manifest, origin)
        _swap_into_place(tmp, out_dir)
        done = True
        return manifest
    except DataError:
        raise
    except Exception as exc:
        why = _one_line(exc)
        raise DataError(f"data: preparing the {cfg.source} dataset failed ({why})") from exc
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
