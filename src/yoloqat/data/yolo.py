"""``data.source: yolo`` -- import a seeded subset of an existing Ultralytics dataset.

The source yaml is resolved the way Ultralytics resolves it (``path`` relative to the yaml's
folder, ``train``/``val`` relative to ``path``, each a folder or a txt list of images, labels
found by swapping the last ``/images/`` for ``/labels/``), but the output is rewritten into
this project's own layout so every later stage sees one format regardless of source.

Every label line is validated and re-written in canonical form; bad lines and unreadable
images are skipped and counted (and summarised in a :class:`DataWarning`), never fatal.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import DataError
from .manifest import (
    IMG_SUFFIXES,
    copy_calib,
    format_label,
    images_dir,
    labels_dir,
    link_or_copy,
    probe_image,
    split_counts,
    unique_stem,
    warn_skipped,
    write_dataset_yaml,
    write_labels,
)

_YOLO_SKIPS = (
    "unreadable_images",
    "malformed_label_lines",
    "unreadable_label_files",
    "images_without_usable_boxes",
)
_SPLIT_STREAM = {"train": 0, "val": 1}


def read_dataset_yaml(dataset_yaml: Path) -> tuple[dict[str, Any], Path, list[str]]:
    """The parsed yaml, its resolved dataset root and its class names."""
    dataset_yaml = Path(dataset_yaml)
    if not dataset_yaml.is_file():
        raise DataError(f"data: YOLO dataset yaml {str(dataset_yaml)!r} not found")
    try:
        doc = yaml.safe_load(dataset_yaml.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = str(dataset_yaml)
        raise DataError(f"data: YOLO dataset yaml {where!r} unreadable ({first})") from None
    if not isinstance(doc, dict):
        raise DataError(f"data: YOLO dataset yaml {str(dataset_yaml)!r} is not a mapping")
    root = Path(str(doc.get("path") or "")).expanduser()
    if not root.is_absolute():
        root = dataset_yaml.parent / root
    return doc, root, _names(doc, dataset_yaml)


def _names(doc: dict[str, Any], source: Path) -> list[str]:
    names = doc.get("names")
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = []
        if keys != list(range(len(names))):
            raise DataError(f"data: {str(source)!r} names keys must be 0..{len(names) - 1}")
        return [str(names[k] if k in names else names[str(k)]) for k in keys]
    if isinstance(names, list):
        return [str(n) for n in names]
    nc = doc.get("nc")
    if isinstance(nc, int) and not isinstance(nc, bool) and nc > 0:
        return [f"class_{i}" for i in range(nc)]
    raise DataError(f"data: {str(source)!r} needs 'names' (a list or mapping) or 'nc'")


def list_split_images(doc: dict[str, Any], root: Path, split: str, source: Path) -> list[Path]:
    """Every image the yaml names for ``split``, sorted, from folders and/or txt lists."""
    entries = doc.get(split)
    if not entries:
        raise DataError(f"data: {str(source)!r} has no '{split}' entry")
    found: set[Path] = set()
    for entry in entries if isinstance(entries, list) else [entries]:
        path = Path(str(entry)).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.suffix.lower() in IMG_SUFFIXES)
        elif path.is_file():
            found.update(_txt_list(path, root))
        else:
            raise DataError(f"data: {str(source)!r} {split} path {str(path)!r} not found")
    return sorted(found)


def _txt_list(txt: Path, root: Path) -> list[Path]:
    out = []
    for raw in txt.read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("./"):
            # Ultralytics' convention: "./x" in a list file is relative to the list's folder.
            out.append(txt.parent / line[2:])
            continue
        p = Path(line).expanduser()
        if not p.is_absolute():
            p = txt.parent / p if (txt.parent / p).exists() else root / p
        out.append(p)
    return out


def label_path_for(image: Path) -> Path:
    """Ultralytics' rule: replace the last ``/images/`` in the path with ``/labels/``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    s = str(image)
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def parse_label_line(line: str, nc: int) -> str | None:
    """A canonical ``cls cx cy w h`` line, or None if the line is not a valid box.

    Valid: exactly five finite numbers, an integral class in [0, nc), centre and size in
    [0, 1], and a positive width and height.  Segment (polygon) lines are not boxes here.
    """
    parts = line.split()
    if len(parts) != 5:
        return None
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    cls, cx, cy, w, h = values
    if not cls.is_integer() or not 0 <= cls < nc:
        return None
    if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)) or w <= 0.0 or h <= 0.0:
        return None
    return format_label(int(cls), cx, cy, w, h)


def _import_split(
    images: list[Path],
    out_dir: Path,
    split: str,
    limit: int,
    nc: int,
    seed: int,
    skips: dict[str, int],
    examples: dict[str, list[str]],
) -> list[Path]:
    """Import up to ``limit`` images of one split; returns their source files, in order."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    img_out, lbl_out = images_dir(out_dir, split), labels_dir(out_dir, split)
    img_out.mkdir(parents=True, exist_ok=True)
    lbl_out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    accepted: list[Path] = []
    # Walk a seeded permutation until `limit` images are accepted, so skipped files do not
    # shrink the subset and the same seed picks the same images.
    for i in rng.permutation(len(images)).tolist():
        if len(accepted) >= limit:
            break
        image = images[i]
        if not image.is_file() or probe_image(image) is None:
            skips["unreadable_images"] += 1
            examples["unreadable_images"].append(image.name)
            continue
        label_file = label_path_for(image)
        lines: list[str] = []
        if label_file.is_file():
            try:
                text = label_file.read_text()
                numbered = [(n, x) for n, x in enumerate(text.splitlines(), 1) if x.strip()]
            except (OSError, UnicodeDecodeError):
                skips["unreadable_label_files"] += 1
                examples["unreadable_label_files"].append(label_file.name)
                continue
            for number, raw in numbered:
                parsed = parse_label_line(raw, nc)
                if parsed is None:
                    skips["malformed_label_lines"] += 1
                    examples["malformed_label_lines"].append(f"{label_file.name}:{number}")
                else:
                    lines.append(parsed)
            if numbered and not lines:
                # It was annotated, just badly: as an empty negative it would teach "no objects".
                skips["images_without_usable_boxes"] += 1
                examples["images_without_usable_boxes"].append(image.name)
                continue
        # No label file at all is Ultralytics' way of marking a background image.
        stem = unique_stem(image.stem, taken)
        link_or_copy(image, img_out / f"{stem}{image.suffix.lower()}")
        write_labels(lbl_out / f"{stem}.txt", lines)
        accepted.append(image)
    return accepted


def import_yolo(
    dataset_yaml: Path, out_dir: Path, max_train: int, max_val: int, calib: int, seed: int
) -> dict[str, Any]:
    """Copy up to ``max_train``/``max_val`` images (seeded) and their labels into ``out_dir``.

    Also writes ``dataset.yaml`` (names preserved) and fills the calib split with ``calib``
    images sampled from the imported train split.

    Returns stats: ``names``, per split ``images``/``instances``/``negatives``/``per_class``,
    ``skipped`` (counts by reason), ``skipped_per_split`` and ``sources`` (per split, the
    source file of every image imported).
    """
    dataset_yaml = Path(dataset_yaml)
    doc, root, names = read_dataset_yaml(dataset_yaml)
    sources = {s: list_split_images(doc, root, s, dataset_yaml) for s in ("train", "val")}
    out_dir = Path(out_dir)
    per_split: dict[str, dict[str, int]] = {}
    imported: dict[str, list[str]] = {}
    for split, limit in (("train", max_train), ("val", max_val)):
        skips = dict.fromkeys(_YOLO_SKIPS, 0)
        examples: dict[str, list[str]] = {k: [] for k in _YOLO_SKIPS}
        files = _import_split(sources[split], out_dir, split, limit, len(names), seed, skips, examples)
        imported[split] = [str(f) for f in files]
        warn_skipped(f"yolo {dataset_yaml.name} {split}", skips, examples)
        per_split[split] = skips
    write_dataset_yaml(out_dir, names)
    per_split["calib"] = {"capped": calib - copy_calib(out_dir, calib, seed)}
    return {
        "names": names,
        "splits": {s: split_counts(out_dir, s, names) for s in ("train", "val", "calib")},
        "skipped": {k: per_split["train"][k] + per_split["val"][k] for k in _YOLO_SKIPS},
        "skipped_per_split": per_split,
        "sources": imported,
    }
