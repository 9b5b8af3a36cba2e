"""Data preparation: every source ends as an Ultralytics YOLO-layout folder plus a manifest.

Sources: the embedded seeded ``synthetic`` shapes set (the default, needs no download), a
``coco`` instances JSON, or an existing ``yolo`` dataset yaml.  Stages call
:func:`prepare_dataset`; the per-source functions are public for tests and notebooks.
:mod:`.splits` is the one reader of a prepared split (export parity and evaluation use it).
"""

from __future__ import annotations

from .coco import build_category_map, convert_coco
from .errors import DataError, DataWarning
from .manifest import content_hash, write_manifest
from .prepare import prepare_dataset
from .shapes import SHAPES
from .synthetic import generate_synthetic
from .yolo import import_yolo

__all__ = [
    "SHAPES",
    "DataError",
    "DataWarning",
    "build_category_map",
    "content_hash",
    "convert_coco",
    "generate_synthetic",
    "import_yolo",
    "prepare_dataset",
    "write_manifest",
]
