"""COCO -> YOLO conversion on a tiny fixture that contains every kind of mess it must survive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from yoloqat.data import DataError, DataWarning, build_category_map, convert_coco
from yoloqat.data.coco import load_coco_json

# Listed out of id order on purpose: the mapping must sort by id, not by file order.
CATEGORIES = [
    {"id": 90, "name": "zebra"},
    {"id": 1, "name": "person"},
    {"id": 5, "name": "airplane"},
]


def _image(path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, (120, 60, 30)).save(path)


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "train2017"
    images.mkdir()
    _image(images / "a.jpg", (100, 80))
    _image(images / "b.png", (50, 40))
    _image(images / "neg.jpg", (30, 30))
    _image(images / "crowdonly.jpg", (30, 30))
    (images / "bad.jpg").write_bytes(b"\x00not an image at all" * 10)
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.png"},  # no size: the real 50x40 is used
            {"id": 3, "file_name": "neg.jpg", "width": 30, "height": 30},
            {"id": 4, "file_name": "bad.jpg", "width": 10, "height": 10},
            {"id": 5, "file_name": "missing.jpg", "width": 10, "height": 10},
            {"id": 6, "file_name": "crowdonly.jpg", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 30], "iscrowd": 0},
            # runs past the right/bottom edge: clipped to [90, 70, 100, 80]
            {"id": 11, "image_id": 1, "category_id": 90, "bbox": [90, 70, 20, 20], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 5, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 13, "image_id": 1, "category_id": 5, "bbox": [5, 5, 0.5, 10], "iscrowd": 0},
            {"id": 14, "image_id": 2, "category_id": 5, "bbox": [5, 4, 10, 8], "iscrowd": 0},
            {"id": 15, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 16, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},
            {"id": 17, "image_id": 6, "category_id": 1, "bbox": [1, 1, 9, 9], "iscrowd": 1},
        ],
        "categories": CATEGORIES,
    }
    json_path = tmp_path / "instances_train.json"
    json_path.write_text(json.dumps(data))
    return json_path, images


def _read(out: Path, split: str, stem: str) -> list[str]:
    return (out / "labels" / split / f"{stem}.txt").read_text().splitlines()


def test_category_map_sorted_by_id() -> None:
    mapping, names = build_category_map({"images": [], "categories": CATEGORIES})
    assert mapping == {1: 0, 5: 1, 90: 2}
    assert names == ["person", "airplane", "zebra"]


def test_convert_exact_labels_and_counts(coco: tuple[Path, Path], tmp_path: Path) -> None:
    json_path, images = coco
    out = tmp_path / "out"
    with pytest.warns(DataWarning) as caught:
        stats = convert_coco(json_path, images, out, "train", 100, True, seed=0)
    text = " ".join(str(w.message) for w in caught)
    assert "unreadable images (bad.jpg)" in text and "missing images (missing.jpg)" in text

    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == [
        "a.jpg",
        "b.png",
        "neg.jpg",
    ]
    assert _read(out, "train", "a") == [
        "0 0.200000 0.312500 0.200000 0.375000",
        "2 0.950000 0.937500 0.100000 0.125000",
    ]
    assert _read(out, "train", "b") == ["1 0.200000 0.200000 0.200000 0.200000"]
    assert (out / "labels" / "train" / "neg.txt").read_text() == ""
    assert stats["names"] == ["person", "airplane", "zebra"]
    assert (stats["images"], stats["instances"], stats["negatives"]) == (3, 3, 1)
    assert stats["per_class"] == {"person": 1, "airplane": 1, "zebra": 1}
    assert stats["skipped"] == {
        "missing_images": 1,
        "unreadable_images": 1,
        "crowd_boxes": 2,
        "degenerate_boxes": 1,
        "malformed_annotations": 0,
        "malformed_categories": 0,
        "malformed_images": 0,
        "unknown_categories": 0,
        "images_without_usable_boxes": 1,
        "negatives_skipped": 0,
    }
    # copied (or hard-linked) byte for byte
    assert (out / "images" / "train" / "a.jpg").read_bytes() == (images / "a.jpg").read_bytes()


def test_negatives_dropped_when_not_kept(coco: tuple[Path, Path], tmp_path: Path) -> None:
    json_path, images = coco
    with pytest.warns(DataWarning):
        stats = convert_coco(json_path, images, tmp_path / "out", "train", 100, False, seed=0)
    assert stats["images"] == 2 and stats["negatives"] == 0
    assert stats["skipped"]["negatives_skipped"] == 1
    assert not (tmp_path / "out" / "labels" / "train" / "neg.txt").exists()


@pytest.mark.filterwarnings("ignore::yoloqat.data.errors.DataWarning")
def test_subset_is_seeded(coco: tuple[Path, Path], tmp_path: Path) -> None:
    json_path, images = coco

    def pick(name: str, seed: int) -> list[str]:
        out = tmp_path / name
        convert_coco(json_path, images, out, "train", 2, True, seed=seed)
        return sorted(p.name for p in (out / "images" / "train").iterdir())

    first, again = pick("s1", 4), pick("s2", 4)
    assert first == again and len(first) == 2
    others = {tuple(pick(f"o{s}", s)) for s in range(6)}
    assert len(others) > 1, "different seeds should pick different subsets"


def test_val_uses_the_train_mapping(tmp_path: Path) -> None:
    images = tmp_path / "val2017"
    images.mkdir()
    _image(images / "v.jpg", (40, 40))
    data = {
        "images": [{"id": 1, "file_name": "v.jpg", "width": 40, "height": 40}],
        "annotations": [
            {"image_id": 1, "category_id": 5, "bbox": [0, 0, 20, 20]},
            {"image_id": 1, "category_id": 7, "bbox": [0, 0, 20, 20]},  # not a train class
        ],
        "categories": [{"id": 5, "name": "airplane"}, {"id": 7, "name": "bus"}],
    }
    json_path = tmp_path / "val.json"
    json_path.write_text(json.dumps(data))
    mapping, names = build_category_map({"categories": CATEGORIES})
    with pytest.warns(DataWarning, match=r"^coco val: skipped 1 unknown categories$"):
        stats = convert_coco(json_path, images, tmp_path / "out", "val", 10, True, 0, mapping, names)
    assert _read(tmp_path / "out", "val", "v") == ["1 0.250000 0.250000 0.500000 0.500000"]
    assert stats["skipped"]["unknown_categories"] == 1
    assert stats["names"] == ["person", "airplane", "zebra"]


def test_missing_or_broken_json_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_coco_json(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_coco_json(tmp_path / "broken.json")



def _one_image_coco(tmp_path: Path, annotations: list, categories: list | None = None,
                    images: list | None = None) -> tuple[Path, Path]:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    _image(folder / "a.jpg", (40, 40))
    _image(folder / "b.jpg", (40, 40))
    data = {
        "images": images if images is not None else [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 40},
            {"id": 2, "file_name": "b.jpg", "width": 40, "height": 40},
        ],
        "annotations": annotations,
    }
    if categories is not None:
        data["categories"] = categories
    json_path = tmp_path / "instances_x.json"
    json_path.write_text(json.dumps(data))
    return json_path, folder


GOOD = {"image_id": 2, "category_id": 1, "bbox": [2, 2, 20, 20]}


@pytest.mark.parametrize(("bad_id", "shown"), [(None, "None"), ("seven", "'seven'"), (True, "True"),
                                               (7.5, "7.5"), ([7], "[7]")])
def test_a_bad_category_id_is_skipped_and_counted_naming_field_and_file(tmp_path, bad_id, shown):
    """`category_id: null` aborted the whole import (TypeError: int() argument ...), 'seven' with
    a ValueError, naming neither the field nor the file."""
    anns = [{"image_id": 1, "category_id": bad_id, "bbox": [2, 2, 20, 20]}, GOOD]
    json_path, folder = _one_image_coco(tmp_path, anns)  # no categories block: ids from annotations
    with pytest.warns(DataWarning) as caught:
        stats = convert_coco(json_path, folder, tmp_path / "out", "train", 10, True, 0)
    said = sorted(str(w.message) for w in caught)
    assert said == [
        "coco train: skipped 1 images without usable boxes",
        (f"coco train: skipped 1 malformed annotations (annotations[0].category_id={shown}) "
        "in instances_x.json"),
    ]
    assert stats["skipped"]["malformed_annotations"] == 1 and stats["images"] == 1
    assert stats["names"] == ["1"] and _read(tmp_path / "out", "train", "b")[0].startswith("0 ")


@pytest.mark.parametrize(("bad_id", "shown"), [(None, "None"), ("seven", "'seven'"), (False, "False")])
def test_a_category_with_a_bad_id_is_skipped_and_counted(tmp_path, bad_id, shown):
    cats = [{"id": bad_id, "name": "ghost"}, {"id": 1, "name": "cat"}, {"id": 1, "name": "again"}]
    json_path, folder = _one_image_coco(tmp_path, [GOOD], categories=cats)
    with pytest.warns(DataWarning) as caught:
        stats = convert_coco(json_path, folder, tmp_path / "out", "train", 10, True, 0)
    assert [str(w.message) for w in caught] == [
        (f"coco train: skipped 2 malformed categories (categories[0].id={shown}, "
        "categories[2].id=1 (repeated)) in instances_x.json")]
    assert stats["names"] == ["cat"] and stats["skipped"]["malformed_categories"] == 2
    assert stats["images"] == 2 and stats["instances"] == 1  # image 1 has no boxes: a negative


def test_bad_bbox_image_id_and_image_entries_are_skipped_and_counted(tmp_path):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": "1234"},  # four characters are not four numbers
        {"image_id": [1], "category_id": 1, "bbox": [2, 2, 20, 20]},  # unhashable: TypeError before
        "not an annotation",
        GOOD,
    ]
    images = [
        {"id": 1, "file_name": "a.jpg"},
        {"id": 2, "file_name": "b.jpg"},
        {"id": {"x": 1}, "file_name": "b.jpg"},  # unorderable id: TypeError in the sort before
        {"id": 3, "file_name": None},
    ]
    json_path, folder = _one_image_coco(tmp_path, anns, [{"id": 1, "name": "cat"}], images)
    with pytest.warns(DataWarning) as caught:
        stats = convert_coco(json_path, folder, tmp_path / "out", "train", 10, True, 0)
    said = sorted(str(w.message) for w in caught)
    assert said == [
        "coco train: skipped 1 images without usable boxes",
        ("coco train: skipped 2 malformed images (images[2].id={'x': 1}, images[3].file_name=None) "
        "in instances_x.json"),
        ("coco train: skipped 3 malformed annotations (annotations[1].image_id=[1], "
        "annotations[2]='not an annotation', annotations[0].bbox='1234') in instances_x.json"),
    ]
    assert stats["skipped"]["malformed_annotations"] == 3 and stats["skipped"]["malformed_images"] == 2
    assert stats["images"] == 1 and stats["sources"] == [str(folder / "b.jpg")]
