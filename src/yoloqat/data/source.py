"""The fingerprint of the source files ``data.path`` points to, so DVC re-runs prepare on edits.

DVC re-runs a stage only when a declared dep changes, and the source data lives outside the
repo (often an absolute path), so prepare cannot name it in dvc.yaml.  The ``source`` stage
runs on every ``dvc exp run`` (``always_changed``), writes this fingerprint to
``data/source.json``, and prepare depends on that file: an unchanged fingerprint leaves prepare
cached, an edited, added or removed file re-runs it.

Each file counts by path, size and modification time (what DVC itself uses to spot changes),
not by content: hashing a COCO image folder on every run would take minutes.  A copy of the
data on another machine therefore re-runs prepare once; prepare rebuilds the same bytes, so
``data/prepared`` keeps its hash and no later stage re-runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .errors import DataError
from .yolo import label_path_for, list_split_images, read_dataset_yaml


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _coco_files(cfg: DataConfig, base: Path) -> Iterable[Path]:
    for rel in (cfg.coco_train_json, cfg.coco_val_json):
        yield base / rel
    for rel in (cfg.coco_train_images, cfg.coco_val_images):
        folder = base / rel
        if folder.is_dir():
            yield from (p for p in folder.rglob("*") if p.is_file())


def _yolo_files(dataset_yaml: Path) -> Iterable[Path]:
    doc, root, _ = read_dataset_yaml(dataset_yaml)
    yield dataset_yaml
    for split in ("train", "val"):
        entries = doc.get(split)
        for entry in entries if isinstance(entries, list) else [entries]:
            listed = _resolve(root, str(entry))
            if listed.is_file():  # a txt list: editing it changes the split
                yield listed
        for image in list_split_images(doc, root, split, dataset_yaml):
            yield image
            yield label_path_for(image)


def source_files(cfg: DataConfig, root: Path) -> list[Path]:
    """Every file prepare may read for ``cfg`` (missing ones included: their absence counts)."""
    if cfg.source == "synthetic":
        return []
    if not cfg.path:
        raise DataError(f"data: data.path must be set when data.source={cfg.source}")
    base = _resolve(Path(root), cfg.path)
    files = _coco_files(cfg, base) if cfg.source == "coco" else _yolo_files(base)
    return sorted(set(files))


def source_fingerprint(cfg: DataConfig, root: Path) -> dict[str, Any]:
    """``{"source", "path", "files", "sha256"}`` over each file's path, size and mtime."""
    digest = hashlib.sha256()
    present = 0
    for path in source_files(cfg, root):
        try:
            st = path.stat()
            entry = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n"
            present += 1
        except FileNotFoundError:
            entry = f"{path}\0missing\n"
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return {"source": cfg.source, "path": cfg.path, "files": present, "sha256": digest.hexdigest()}
