"""One reader for a split of a prepared (Ultralytics-layout) dataset, used by export and evaluate.

Images are listed with the same rules as the ``yolo`` importer (:mod:`yoloqat.data.yolo`):
folders or txt lists, ``path`` relative to the yaml, labels found by Ultralytics' ``/images/``
-> ``/labels/`` rule.  Boxes come back in original-image pixels; preprocessing is Ultralytics'
own ``LetterBox``, so ONNX and PyTorch models see exactly what the validator feeds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .yolo import label_path_for, list_split_images, read_dataset_yaml


@dataclass
class Sample:
    path: Path
    image_id: int | str
    width: int
    height: int
    boxes: np.ndarray  # (M, 4) float32 xyxy, original pixels
    classes: np.ndarray  # (M,) int64


def image_id_of(path: Path) -> int | str:
    return int(path.stem) if path.stem.isnumeric() else path.stem


def read_labels(path: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (xyxy pixels) and classes of a YOLO label file; a polygon line gives its bbox."""
    boxes, classes = [], []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            vals = line.split()
            if not vals:
                continue
            try:
                nums = [float(v) for v in vals]
            except ValueError:
                raise DataError(f"label file {str(path)!r} line {n} is not numeric") from None
            if len(nums) == 5:
                cx, cy, w, h = nums[1:]
                x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            elif len(nums) >= 7 and len(nums) % 2 == 1:  # polygon: its bounding box
                xs, ys = nums[1::2], nums[2::2]
                x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
            else:
                raise DataError(f"label file {str(path)!r} line {n} is malformed")
            classes.append(int(nums[0]))
            boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64))


def read_split(
    dataset_yaml: Path, split: str = "val", require_labels: bool = True
) -> tuple[list[Sample], dict[int, str]]:
    """The images of a split of a dataset yaml with their boxes in pixels, and the class names."""
    from PIL import Image
    from ultralytics.data.utils import exif_size

    dataset_yaml = Path(dataset_yaml)
    if not dataset_yaml.is_file():
        raise DataError(f"dataset {str(dataset_yaml)!r} not found; run the prepare stage first")
    doc, root, names = read_dataset_yaml(dataset_yaml)
    images = list_split_images(doc, root, split, dataset_yaml)
    if not images:
        raise DataError(f"the {split} split of {str(dataset_yaml)!r} has no images")
    label_paths = [label_path_for(p) for p in images]
    if require_labels and not any(p.is_file() for p in label_paths):
        raise DataError(
            f"the {split} split of {str(dataset_yaml)!r} has no label files "
            f"(looked for e.g. {str(label_paths[0])!r}); cannot score it"
        )
    samples = []
    for img, lbl in zip(images, label_paths, strict=True):
        try:
            with Image.open(img) as im:
                width, height = exif_size(im)
        except OSError:
            raise DataError(f"image {str(img)!r} is unreadable") from None
        boxes, classes = read_labels(lbl, width, height)
        samples.append(Sample(img, image_id_of(img), width, height, boxes, classes))
    return samples, dict(enumerate(names))


def letterbox_batch(samples: Sequence[Sample], imgsz: int) -> np.ndarray:
    """Ultralytics' LetterBox to ``imgsz`` (centered, pad 114), BGR->RGB, CHW, float32 /255."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.patches import imread

    lb = LetterBox(new_shape=(imgsz, imgsz), auto=False, stride=32)
    out = np.empty((len(samples), 3, imgsz, imgsz), np.float32)
    for i, s in enumerate(samples):
        im = imread(str(s.path))
        if im is None:
            raise DataError(f"image {str(s.path)!r} is unreadable")
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        im = lb(image=im[..., :3])
        out[i] = im[..., ::-1].transpose(2, 0, 1) / np.float32(255.0)
    return out
