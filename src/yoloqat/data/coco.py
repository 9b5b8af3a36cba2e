"""``data.source: coco`` -- a seeded subset of a COCO instances JSON in the YOLO layout.

Real annotations are messy, so this converter never crashes halfway through a split: every
item it cannot use is skipped, counted in the returned stats (which end up in the manifest)
and summarised in one :class:`DataWarning` per kind.  That includes a bad field (a category id
that is not an integer, a bbox that is not four finite numbers, an unhashable image id): the
warning names the field, its value and the JSON file.  Only an unusable *source* (missing or
invalid JSON) raises :class:`DataError`.

Class indices must mean the same thing in train and val, so the category map is built once
from the train JSON (:func:`build_category_map`) and passed to both conversions.
"""

from __future__ import annotations

import json
import math
import re
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
    "malformed_categories",
    "malformed_images",
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


_INT_TEXT = re.compile(r"^\s*[-+]?\d+\s*$")


def category_id(value: Any) -> int | None:
    """A COCO category id as an int, or None when it is not one (null, bool, "seven", 7.5, a list).

    COCO ids are integers; an integral float (7.0) or integer text ("7") names the same id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.match(value):
        return int(value)
    return None


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _categories(data: dict[str, Any]) -> tuple[list[tuple[int, str]], list[str]]:
    """(id, name) of the usable categories, in file order, and a description of each bad one
    (``categories[3].id=None``): no id, an id that is not an integer, or a repeated id."""
    good: list[tuple[int, str]] = []
    bad: list[str] = []
    seen: set[int] = set()
    raw = data.get("categories")
    for i, c in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(c, dict):
            bad.append(f"categories[{i}]={_shown(c)}")
            continue
        cid = category_id(c.get("id"))
        if cid is None:
            bad.append(f"categories[{i}].id={_shown(c.get('id'))}")
        elif cid in seen:
            bad.append(f"categories[{i}].id={cid} (repeated)")
        else:
            seen.add(cid)
            good.append((cid, str(c.get("name", cid))))
    return good, bad


def build_category_map(data: dict[str, Any]) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> contiguous class index, in ascending id order, plus the names.

    COCO ids have gaps (1..90 for 80 classes); YOLO needs 0..nc-1.  Sorting by id makes the
    mapping independent of the order categories happen to be listed in the file.  Categories
    whose id is missing, not an integer or repeated are left out (:func:`convert_coco` counts
    them as ``malformed_categories``).
    """
    cats, _ = _categories(data)
    if cats:
        ordered = sorted(cats)
        ids = [cid for cid, _ in ordered]
        names = [name for _, name in ordered]
    else:
        # No categories block: fall back to the ids the annotations use, named by id (a bad
        # category_id is counted as a malformed annotation when its image is converted).
        found = (category_id(a.get("category_id")) for a in _annotations(data))
        ids = sorted({cid for cid in found if cid is not None})
        names = [str(i) for i in ids]
    return {cid: i for i, cid in enumerate(ids)}, names


def _annotations(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in _annotation_rows(data) if isinstance(a, dict)]


def _annotation_rows(data: dict[str, Any]) -> list[Any]:
    raw = data.get("annotations")
    return raw if isinstance(raw, list) else []


def _positive(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if math.isfinite(v) and v > 0:
            return v
    return None


def _bbox(value: Any) -> tuple[float, float, float, float] | None:
    """``[x, y, w, h]`` as four finite floats, or None (not a list of four real numbers)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    x, y, w, h = (float(v) for v in value)
    return (x, y, w, h) if all(math.isfinite(v) for v in (x, y, w, h)) else None


def _label_line(
    ann: dict[str, Any], width: float, height: float, category_map: dict[int, int], skips: dict,
    bad_fields: list[str], where: str,
) -> tuple[int, str] | None:
    if ann.get("iscrowd"):
        # Crowd regions box many instances at once; as a box they would teach wrong extents.
        skips["crowd_boxes"] += 1
        return None
    cid = category_id(ann.get("category_id"))
    box = _bbox(ann.get("bbox"))
    if cid is None or box is None:
        skips["malformed_annotations"] += 1
        field = "category_id" if cid is None else "bbox"
        bad_fields.append(f"{where}.{field}={_shown(ann.get(field))}")
        return None
    cls = category_map.get(cid)
    if cls is None:
        skips["unknown_categories"] += 1
        return None
    x, y, w, h = box
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, width), min(y + h, height)
    if x2 - x1 <= 1.0 or y2 - y1 <= 1.0:
        skips["degenerate_boxes"] += 1
        return None
    line = format_label(
        cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height
    )
    return cls, line


def _image_records(data: dict[str, Any], bad: list[str]) -> list[dict[str, Any]]:
    """The usable image entries sorted by id (an int or a string, and a file name); each other
    entry is described in ``bad`` (``images[2].id=None``)."""
    records = []
    for i, r in enumerate(data["images"]):
        if not isinstance(r, dict):
            bad.append(f"images[{i}]={_shown(r)}")
        elif isinstance(r.get("id"), bool) or not isinstance(r.get("id"), (int, str)):
            bad.append(f"images[{i}].id={_shown(r.get('id'))}")
        elif not isinstance(r.get("file_name"), str) or not r["file_name"]:
            bad.append(f"images[{i}].file_name={_shown(r.get('file_name'))}")
        else:
            records.append(r)
    return sorted(records, key=lambda r: (str(type(r["id"])), r["id"]))


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

    An entry with a bad field is skipped and counted, never fatal: a category without an integer
    id (``malformed_categories``), an image without an int/str id or a file name
    (``malformed_images``), an annotation without an integer ``category_id`` or a four-number
    ``bbox``, or whose ``image_id`` is a list or mapping (``malformed_annotations``).  The
    warning names the field, its value and the JSON file.

    Returns stats: ``split``, ``names``, ``images``, ``instances``, ``negatives``, ``per_class``,
    ``skipped`` (counts by reason), ``category_map`` (to pass on to the val conversion) and
    ``sources`` (the source file of every image written, in output order).
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

    skips = dict.fromkeys(_COCO_SKIPS, 0)
    examples: dict[str, list[str]] = {
        "missing_images": [], "unreadable_images": [], "malformed_annotations": [],
        "malformed_categories": _categories(data)[1], "malformed_images": [],
    }
    skips["malformed_categories"] = len(examples["malformed_categories"])
    # each annotation with its index in the file, so a warning can point at it
    by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, ann in enumerate(_annotation_rows(data)):
        if not isinstance(ann, dict):
            skips["malformed_annotations"] += 1
            examples["malformed_annotations"].append(f"annotations[{i}]={_shown(ann)}")
            continue
        image_id = ann.get("image_id")
        if isinstance(image_id, (list, dict)):  # unhashable: cannot name an image
            skips["malformed_annotations"] += 1
            examples["malformed_annotations"].append(f"annotations[{i}].image_id={_shown(image_id)}")
            continue
        by_image[image_id].append((i, ann))
    records = _image_records(data, examples["malformed_images"])
    skips["malformed_images"] = len(examples["malformed_images"])
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(records))

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
            for i, ann in anns
            if (lab := _label_line(ann, width, height, category_map, skips,
                                   examples["malformed_annotations"], f"annotations[{i}]"))
            is not None
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
    accepted.sort(key=lambda item: item[0].as_posix())
    for src, labels in accepted:
        stem = unique_stem(src.stem, taken)
        link_or_copy(src, img_out / f"{stem}{src.suffix.lower()}")
        write_labels(lbl_out / f"{stem}.txt", [line for _, line in labels])
        instances += len(labels)
        negatives += not labels
        for cls, _ in labels:
            per_class[class_names[cls]] += 1
    field_kinds = ("malformed_annotations", "malformed_categories", "malformed_images")
    warn_skipped(f"coco {split}", skips, examples,
                 where=dict.fromkeys(field_kinds, Path(json_path).name))
    return {
        "split": split,
        "names": class_names,
        "images": len(accepted),
        "instances": instances,
        "negatives": negatives,
        "per_class": per_class,
        "skipped": skips,
        "category_map": dict(category_map),
        "sources": [str(src) for src, _ in accepted],
    }


def merge_skips(stats: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Sum the ``skipped`` counters of several conversions (train + val) for the manifest."""
    total: dict[str, int] = {}
    for s in stats:
        for key, value in (s.get("skipped") or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total
