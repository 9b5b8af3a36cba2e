"""The output layout every source writes, and the manifest that fingerprints it.

All three sources (synthetic, COCO, an existing YOLO set) end in the same Ultralytics layout,
so the helpers that define that layout live here, next to the code that describes it:

    images/{train,val,calib}/<stem>.<ext>   labels/{train,val,calib}/<stem>.txt
    dataset.yaml                            manifest.json

Counts in the manifest are read back from the files on disk rather than trusted from the
converters, so the manifest describes exactly what training will see.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from .errors import DataWarning

SPLITS = ("train", "val", "calib")
# The suffixes Ultralytics' loader accepts that PIL can also verify; anything else is skipped.
IMG_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
MANIFEST_NAME = "manifest.json"
YAML_NAME = "dataset.yaml"
SKIP_KEYS = ("unreadable_images", "malformed_label_lines", "degenerate_boxes", "crowd_boxes")


# --------------------------------------------------------------------------------------------
# layout


def images_dir(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / "images" / split


def labels_dir(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / "labels" / split


def format_label(cls: int, cx: float, cy: float, w: float, h: float) -> str:
    """One label line; six decimals keeps sub-pixel precision up to ~4000 px images."""
    return f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def write_labels(path: Path, lines: Sequence[str]) -> None:
    """Write a label file; negatives get an empty file so Ultralytics counts them as background."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def write_dataset_yaml(dataset_dir: Path, names: Sequence[str]) -> Path:
    """Write dataset.yaml without a ``path`` key.

    Ultralytics then resolves ``train``/``val`` against the yaml's own folder, so the folder can
    be moved, opened from any cwd, or copied into a DVC queue temp workspace.
    """
    doc = {
        "train": "images/train",
        "val": "images/val",
        "calib": "images/calib",
        "nc": len(names),
        "names": {i: str(n) for i, n in enumerate(names)},
    }
    out = Path(dataset_dir) / YAML_NAME
    out.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return out


def read_names(dataset_dir: Path) -> list[str]:
    doc = yaml.safe_load((Path(dataset_dir) / YAML_NAME).read_text()) or {}
    names = doc.get("names") or {}
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (no extra disk for a COCO-sized source), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_SUFFIXES)


def probe_image(path: Path) -> tuple[int, int] | None:
    """Real (w, h) if PIL can verify *and* decode the file, else None.

    ``verify()`` alone misses truncated JPEGs (it checks little beyond the header), which would
    then fail inside the training dataloader, so the image is decoded once as well.
    """
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        with Image.open(path) as im:
            im.load()
    # A corrupt file can make PIL's decoders raise nearly anything (OSError, SyntaxError,
    # struct.error, IndexError, DecompressionBombError...); all of them mean "unreadable".
    except Exception:  # noqa: BLE001
        return None
    return (int(size[0]), int(size[1]))


def warn_skipped(
    tag: str, skips: dict[str, int], examples: dict[str, list[str]],
    where: dict[str, str] | None = None,
) -> None:
    """One warning per kind of skipped item that occurred (with a few names where known),
    instead of one per item: every kind the manifest counts is also said on the terminal.
    ``where`` names the file a kind's examples are in (``... in instances_val2017.json``)."""
    for kind, count in skips.items():
        if not count:
            continue
        files = examples.get(kind) or []
        shown = " (" + ", ".join(files[:3]) + (", ..." if len(files) > 3 else "") + ")" if files else ""
        source = f" in {where[kind]}" if where and kind in where else ""
        warnings.warn(
            f"{tag}: skipped {count} {kind.replace('_', ' ')}{shown}{source}", DataWarning,
            stacklevel=3,
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_val_overlap(
    dataset_dir: Path, train_sources: Sequence[str | Path], val_sources: Sequence[str | Path]
) -> dict[str, int]:
    """How many written val images are also train images, and warn when any are.

    ``same_file``: val images imported from a file that a train image was imported from too
    (e.g. a dataset yaml with ``val: images/train``, or COCO train and val JSONs listing one
    folder); ``same_content``: val images whose bytes equal a written train image's (the same
    file, or a copy under another name).  Val scores of such a dataset overstate the model, but
    it may be deliberate (a smoke test), so it is a warning and the counts go in the manifest.
    Only files of equal size are hashed.
    """
    dataset_dir = Path(dataset_dir)
    train_real = {os.path.realpath(p) for p in train_sources}
    same_file = sum(os.path.realpath(p) in train_real for p in val_sources)
    by_size: dict[int, list[Path]] = {}
    for img in image_files(images_dir(dataset_dir, "train")):
        by_size.setdefault(img.stat().st_size, []).append(img)
    hashed: dict[int, set[str]] = {}
    val = image_files(images_dir(dataset_dir, "val"))
    same_content = 0
    for img in val:
        size = img.stat().st_size
        if size not in by_size:
            continue
        if size not in hashed:
            hashed[size] = {_sha256(p) for p in by_size[size]}
        same_content += _sha256(img) in hashed[size]
    counts = {"val_images": len(val), "same_file": same_file, "same_content": same_content}
    if same_file or same_content:
        warnings.warn(
            f"data: {max(same_file, same_content)} of {len(val)} val images are also train images "
            f"({same_file} the same file, {same_content} the same content); val scores will "
            "overstate the model", DataWarning, stacklevel=3,
        )
    return counts


def unique_stem(stem: str, taken: set[str]) -> str:
    """A file stem not used yet in this split: two sources may share a name in different dirs."""
    candidate, n = stem, 1
    while candidate in taken:
        candidate = f"{stem}_{n}"
        n += 1
    taken.add(candidate)
    return candidate


def copy_calib(dataset_dir: Path, n: int, seed: int) -> int:
    """Fill images/calib with ``n`` images sampled (seeded) from the already written train split.

    Calibration must see the training distribution, and sampling from the written split (not the
    source) guarantees every calib image is one that passed validation.  Fewer train images
    than ``n`` caps the split, with a warning; returns how many were copied.
    """
    train = image_files(images_dir(dataset_dir, "train"))
    rng = np.random.default_rng([seed, 2])
    picks = sorted(rng.permutation(len(train))[: min(n, len(train))].tolist())
    if len(picks) < n:
        warnings.warn(
            f"calib: data.calib_images={n} but the train split has {len(train)} images; "
            f"calib holds {len(picks)}", DataWarning, stacklevel=2,
        )
    images_dir(dataset_dir, "calib").mkdir(parents=True, exist_ok=True)
    labels_dir(dataset_dir, "calib").mkdir(parents=True, exist_ok=True)
    for i in picks:
        img = train[i]
        link_or_copy(img, images_dir(dataset_dir, "calib") / img.name)
        label = labels_dir(dataset_dir, "train") / f"{img.stem}.txt"
        link_or_copy(label, labels_dir(dataset_dir, "calib") / label.name)
    return len(picks)


def split_counts(dataset_dir: Path, split: str, names: Sequence[str]) -> dict[str, Any]:
    """Images, instances, negatives and per-class instances of one written split."""
    per_class = dict.fromkeys(names, 0)
    instances = negatives = 0
    images = image_files(images_dir(dataset_dir, split))
    for img in images:
        label = labels_dir(dataset_dir, split) / f"{img.stem}.txt"
        lines = label.read_text().split("\n") if label.is_file() else []
        classes = [int(line.split()[0]) for line in lines if line.strip()]
        if not classes:
            negatives += 1
        instances += len(classes)
        for c in classes:
            per_class[names[c]] += 1
    return {
        "images": len(images),
        "instances": instances,
        "negatives": negatives,
        "per_class": per_class,
    }


# --------------------------------------------------------------------------------------------
# fingerprint and manifest


def _hashed_files(dataset_dir: Path) -> Iterable[Path]:
    for sub in ("images", "labels"):
        root = dataset_dir / sub
        if root.is_dir():
            # Ultralytics drops labels/*.cache next to the labels when it first loads a split;
            # that file is derived, so it must not change the dataset's identity.
            yield from (p for p in root.rglob("*") if p.is_file() and p.suffix != ".cache")
    if (dataset_dir / YAML_NAME).is_file():
        yield dataset_dir / YAML_NAME


def content_hash(dataset_dir: Path) -> str:
    """sha256 over the sorted relative paths and bytes of images/, labels/ and dataset.yaml.

    Each path and payload is length-prefixed so that moving bytes between a name and a file
    can never produce the same digest.  The manifest itself is excluded (it holds the hash).
    """
    dataset_dir = Path(dataset_dir)
    digest = hashlib.sha256()
    rels = sorted((p.relative_to(dataset_dir).as_posix(), p) for p in _hashed_files(dataset_dir))
    for rel_text, path in rels:
        rel = rel_text.encode()
        data = path.read_bytes()
        digest.update(len(rel).to_bytes(8, "little") + rel)
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def write_manifest(dataset_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write manifest.json describing the dataset in ``dataset_dir`` and return it.

    ``info`` supplies what the files cannot tell: ``source``, ``seed``, ``params`` and
    ``skipped`` (counts of items dropped on the way in); any other keys are kept as given
    (coco and yolo: ``train_val_overlap``, from :func:`train_val_overlap`).
    Everything else is measured from disk.  Nothing time- or host-dependent is recorded, so the
    same seed and params give a byte-identical manifest.
    """
    dataset_dir = Path(dataset_dir)
    names = read_names(dataset_dir)
    counts = {s: split_counts(dataset_dir, s, names) for s in SPLITS}
    skipped = {k: 0 for k in SKIP_KEYS}
    skipped.update({k: int(v) for k, v in (info.get("skipped") or {}).items()})
    manifest: dict[str, Any] = {
        "source": info.get("source"),
        "seed": info.get("seed"),
        "params": info.get("params", {}),
        "nc": len(names),
        "names": dict(enumerate(names)),
        "splits": {
            s: {k: c[k] for k in ("images", "instances", "negatives")} for s, c in counts.items()
        },
        "instances_per_class": {s: c["per_class"] for s, c in counts.items()},
        "skipped": skipped,
        # the same counts per split (calib: "capped" = asked minus what the train split had)
        "skipped_per_split": {
            s: {k: int(v) for k, v in (info.get("skipped_per_split") or {}).get(s, {}).items()}
            for s in SPLITS
        },
    }
    for key, value in info.items():
        manifest.setdefault(key, value)
    manifest["content_hash"] = content_hash(dataset_dir)
    text = json.dumps(manifest, indent=2, default=str)
    (dataset_dir / MANIFEST_NAME).write_text(text + "\n")
    # Round-trip so the caller gets exactly what is on disk (int keys become strings in JSON).
    return json.loads(text)
