"""``data.source: coco`` -- a seeded subset of a COCO instances JSON in the YOLO layout.

Real annotations are messy, so this converter never crashes halfway through a split: every
item it cannot use is skipped, counted in the returned stats (which end up in the manifest)
and summarised in one :class:`DataWarning` per kind.  Only an unusable *source* (missing or
invalid JSON) raises :class:`DataError`.

Class indices must mean the same thing in train and val, so the category map is built once
from the train JSON (:func:`build_category_map`) and passed to both conversions.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .manifest import (
    IMG_SUFFIXES,
    SPLITS,
    format_label,
    labels_dir,
    link_or_copy,
    probe_image,
    unique_stem,
    warn_skipped,
    write_labels,
)
from .manifest import images_dir as split_images_dir

_COCO_SKIPS = (
    "missing_images",
    "unreadable_images",
    "crowd_boxes",
    "degenerate_boxes",
    "malformed_annotations",
    "unknown_categories",
    "images_without_usable_boxes",
    "negatives_skipped",
)


def load_coco_json(json_path: Path) -> dict[str, Any]:
    """Read a COCO instances file, turning every way it can be unusable into a DataError."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"data: COCO annotations {str(json_path)!r} not found")
    try:
        data = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"data: COCO annotations {str(json_path)!r} unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"data: COCO annotations {str(json_path)!r} have no 'images' list")
    return data


def build_category_map(data: dict[str, Any]) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> contiguous class index, in ascending id order, plus the names.

    COCO ids have gaps (1..90 for 80 classes); YOLO needs 0..nc-1.  Sorting by id makes the
    mapping independent of the order categories happen to be listed in the file.
    """
    cats = [c for c in data.get("categories") or [] if isinstance(c, dict) and "id" in c]
    if cats:
        ordered = sorted(cats, key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in ordered]
        names = [str(c.get("name", c["id"])) for c in ordered]
    else:
        # No categories block: fall back to the ids the annotations use, named by id.
        ids = sorted({int(a["category_id"]) for a in _annotations(data) if "category_id" in a})
        names = [str(i) for i in ids]
    return {cid: i for i, cid in enumerate(ids)}, names


def _annotations(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in data.get("annotations") or [] if isinstance(a, dict)]


def _positive(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if math.isfinite(v) and v > 0:
            return v
    return None


def _label_line(
    ann: dict[str, Any], width: float, height: float, category_map: dict[int, int], skips: dict
) -> tuple[int, str] | None:
    if ann.get("iscrowd"):
        # Crowd regions box many instances at once; as a box they would teach wrong extents.
        skips["crowd_boxes"] += 1
        return None
    try:
        cls = category_map.get(int(ann["category_id"]))
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        skips["malformed_annotations"] += 1
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        skips["malformed_annotations"] += 1
        return None
    if cls is None:
        skips["unknown_categories"] += 1
        return None
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, width), min(y + h, height)
    if x2 - x1 <= 1.0 or y2 - y1 <= 1.0:
        skips["degenerate_boxes"] += 1
        return None
    line = format_label(
        cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
    )
    return cls, line


def convert_coco(
    json_path: Path,
    images_dir: Path,
    out_dir: Path,
    split: str,
    max_images: int,
    keep_negatives: bool,
    seed: int,
    category_map: dict[int, int] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write up to ``max_images`` usable images of one COCO split into ``out_dir``'s YOLO layout.

    Selection is a seeded permutation of the images sorted by id, walked until ``max_images``
    images have been accepted, so unreadable files do not shrink the subset and the same seed
    always picks the same images.  Boxes are clipped to the image; ``iscrowd`` boxes and boxes
    with a side <= 1 px after clipping are dropped.  An image with no annotations is a negative
    (kept only if ``keep_negatives``); an image whose annotations were *all* dropped is skipped,
    because it does contain objects and must not teach "nothing here".

    Pass the train conversion's ``category_map`` and ``names`` when converting val.

    Returns stats: ``split``, ``names``, ``images``, ``instances``, ``negatives``, ``per_class``,
    ``skipped`` (counts by reason) and ``category_map`` (to pass on to the val conversion).
    """
    if split not in SPLITS:
        raise DataError(f"data: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    data = load_coco_json(json_path)
    own_map, own_names = build_category_map(data)
    if category_map is None:
        category_map, class_names = own_map, own_names
    elif names is not None:
        class_names = [str(n) for n in names]
    else:
        # A val JSON may list fewer categories than train; name what it knows, ids otherwise.
        id_to_name = dict(zip(own_map, own_names, strict=True))
        class_names = [""] * len(category_map)
        for cid, idx in category_map.items():
            class_names[idx] = id_to_name.get(cid, str(cid))
    if len(class_names) != len(set(category_map.values())):
        raise DataError(f"data: {len(class_names)} class names for {len(category_map)} categories")

    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in _annotations(data):
        by_image[ann.get("image_id")].append(ann)
    records = sorted(
        (r for r in data["images"] if isinstance(r, dict) and "id" in r and r.get("file_name")),
        key=lambda r: (str(type(r["id"])), r["id"]),
    )
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(records))

    skips = dict.fromkeys(_COCO_SKIPS, 0)
    examples: dict[str, list[str]] = {"missing_images": [], "unreadable_images": []}
    accepted: list[tuple[Path, list[tuple[int, str]]]] = []
    for i in order.tolist():
        if len(accepted) >= max_images:
            break
        record = records[i]
        anns = by_image.get(record["id"], [])
        if not anns and not keep_negatives:
            skips["negatives_skipped"] += 1
            continue
        src = Path(images_dir) / str(record["file_name"])
        if not src.is_file():
            skips["missing_images"] += 1
            examples["missing_images"].append(str(record["file_name"]))
            continue
        real = probe_image(src) if src.suffix.lower() in IMG_SUFFIXES else None
        if real is None:
            skips["unreadable_images"] += 1
            examples["unreadable_images"].append(str(record["file_name"]))
            continue
        # The JSON size is what the boxes were drawn against; the file's size is the fallback.
        width = _positive(record.get("width")) or float(real[0])
        height = _positive(record.get("height")) or float(real[1])
        labels = [
            lab
            for ann in anns
            if (lab := _label_line(ann, width, height, category_map, skips)) is not None
        ]
        if anns and not labels:
            skips["images_without_usable_boxes"] += 1
            continue
        accepted.append((src, labels))

    out_dir = Path(out_dir)
    img_out, lbl_out = split_images_dir(out_dir, split), labels_dir(out_dir, split)
    img_out.mkdir(parents=True, exist_ok=True)
    lbl_out.mkdir(parents=True, exist_ok=True)
    per_class = dict.fromkeys(class_names, 0)
    taken: set[str] = set()
    instances = negatives = 0
    for src, labels in sorted(accepted, key=lambda item: item[0].as_posix()):
        stem = unique_stem(src.stem, taken)
        link_or_copy(src, img_out / f"{stem}{src.suffix.lower()}")
        write_labels(lbl_out / f"{stem}.txt", [line for _, line in labels])
        instances += len(labels)
        negatives += not labels
        for cls, _ in labels:
            per_class[class_names[cls]] += 1
    warn_skipped(f"coco {split}", skips, examples)
    return {
        "split": split,
        "names": class_names,
        "images": len(accepted),
        "instances": instances,
        "negatives": negatives,
        "per_class": per_class,
        "skipped": skips,
        "category_map": dict(category_map),
    }


def merge_skips(stats: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Sum the ``skipped`` counters of several conversions (train + val) for the manifest."""
    total: dict[str, int] = {}
    for s in stats:
        for key, value in (s.get("skipped") or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total
