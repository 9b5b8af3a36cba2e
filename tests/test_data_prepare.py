"""prepare_dataset: atomic replacement, one-line errors, a manifest, a cwd-independent yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from yoloqat.config import DataConfig
from yoloqat.data import DataError, DataWarning, content_hash, prepare_dataset
from yoloqat.data import prepare as prepare_mod

SMALL = DataConfig(train_images=12, val_images=4, calib_images=3, imgsz=64, num_classes=5)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_synthetic_prepare_writes_dataset_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "data" / "dataset"
    manifest = prepare_dataset(SMALL, 5, out, tmp_path)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["source"] == "synthetic" and manifest["seed"] == 5
    assert manifest["params"]["num_classes"] == 5 and manifest["params"]["difficulty"] == 1.0
    assert {s: v["images"] for s, v in manifest["splits"].items()} == {
        "train": 12,
        "val": 4,
        "calib": 3,
    }
    train = manifest["splits"]["train"]
    assert sum(manifest["instances_per_class"]["train"].values()) == train["instances"]
    assert set(manifest["instances_per_class"]["train"]) == set(manifest["names"].values())
    assert set(manifest["skipped"]) >= {
        "unreadable_images",
        "malformed_label_lines",
        "degenerate_boxes",
        "crowd_boxes",
    }
    assert manifest["content_hash"] == content_hash(out)
    assert _leftovers(out.parent) == []


def test_same_seed_same_hash_and_rerun_replaces(tmp_path: Path) -> None:
    a = prepare_dataset(SMALL, 1, tmp_path / "a", tmp_path)
    b = prepare_dataset(SMALL, 1, tmp_path / "b", tmp_path)
    assert a["content_hash"] == b["content_hash"]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()
    (tmp_path / "a" / "stale.txt").write_text("from an older run")
    c = prepare_dataset(SMALL, 2, tmp_path / "a", tmp_path)
    assert c["content_hash"] != a["content_hash"]
    assert not (tmp_path / "a" / "stale.txt").exists()
    assert _leftovers(tmp_path) == []


def test_failure_leaves_out_dir_untouched_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "keep.txt").write_text("previous dataset")

    def half_written(out_dir: Path, **_: object) -> dict:
        (Path(out_dir) / "images" / "train").mkdir(parents=True)
        (Path(out_dir) / "images" / "train" / "x.jpg").write_bytes(b"partial")
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(prepare_mod, "generate_synthetic", half_written)
    with pytest.raises(DataError) as info:
        prepare_dataset(SMALL, 0, out, tmp_path)
    message = str(info.value)
    assert "\n" not in message and "RuntimeError: disk full" in message
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_failing_source_creates_nothing(tmp_path: Path) -> None:
    cfg = DataConfig(source="yolo", path="missing/data.yaml")
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(cfg, 0, tmp_path / "dataset", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _coco_source(root: Path) -> None:
    images = root / "coco" / "train2017"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"not a jpeg")
    (images / "b.jpg").write_bytes(b"")
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 10, "height": 10},
            {"id": 2, "file_name": "b.jpg", "width": 10, "height": 10},
        ],
        "annotations": [{"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}],
        "categories": [{"id": 3, "name": "car"}],
    }
    (root / "coco" / "annotations").mkdir()
    (root / "coco" / "annotations" / "train.json").write_text(json.dumps(data))


@pytest.mark.filterwarnings("ignore::yoloqat.data.errors.DataWarning")
def test_zero_usable_training_images_names_the_source(tmp_path: Path) -> None:
    _coco_source(tmp_path)
    cfg = DataConfig(
        source="coco",
        path="coco",
        coco_train_json="annotations/train.json",
        coco_val_json="annotations/train.json",
    )
    with pytest.raises(DataError) as info:
        prepare_dataset(cfg, 0, tmp_path / "dataset", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "zero usable train images" in message
    assert "annotations/train.json" in message and "unreadable_images=2" in message
    assert not (tmp_path / "dataset").exists() and _leftovers(tmp_path) == []


def test_coco_prepare_shares_mapping_and_samples_calib(tmp_path: Path) -> None:
    base = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        (base / split).mkdir(parents=True)
    train_images, val_images = [], []
    for i in range(6):
        Image.new("RGB", (20, 20), (i * 30, 0, 0)).save(base / "train2017" / f"{i}.jpg")
        train_images.append({"id": i, "file_name": f"{i}.jpg", "width": 20, "height": 20})
    # not black: 0.jpg is black, and the same bytes in train and val are an overlap (warned)
    Image.new("RGB", (20, 20), (0, 0, 200)).save(base / "val2017" / "v.jpg")
    val_images.append({"id": 1, "file_name": "v.jpg", "width": 20, "height": 20})
    cats = [{"id": 9, "name": "dog"}, {"id": 2, "name": "cat"}]
    train = {
        "images": train_images,
        "annotations": [
            {"image_id": i, "category_id": 9 if i % 2 else 2, "bbox": [2, 2, 10, 10]}
            for i in range(6)
        ],
        "categories": cats,
    }
    # val lists only one category; the index must still come from the train mapping
    val = {
        "images": val_images,
        "annotations": [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 20, 20]}],
        "categories": [{"id": 9, "name": "dog"}],
    }
    (base / "annotations").mkdir()
    (base / "annotations" / "t.json").write_text(json.dumps(train))
    (base / "annotations" / "v.json").write_text(json.dumps(val))
    cfg = DataConfig(
        source="coco",
        path="coco",
        coco_train_json="annotations/t.json",
        coco_val_json="annotations/v.json",
        train_images=5,
        calib_images=2,
    )
    out = tmp_path / "dataset"
    manifest = prepare_dataset(cfg, 0, out, tmp_path)
    assert manifest["names"] == {"0": "cat", "1": "dog"}
    assert (out / "labels" / "val" / "v.txt").read_text().split()[0] == "1"
    assert [manifest["splits"][s]["images"] for s in ("train", "val", "calib")] == [5, 1, 2]
    assert manifest["train_val_overlap"] == {"val_images": 1, "same_file": 0, "same_content": 0}
    calib = {p.name for p in (out / "images" / "calib").iterdir()}
    assert calib <= {p.name for p in (out / "images" / "train").iterdir()}
    for name in calib:
        stem = Path(name).stem
        assert (out / "labels" / "calib" / f"{stem}.txt").read_text() == (
            out / "labels" / "train" / f"{stem}.txt"
        ).read_text()


def test_dataset_yaml_resolves_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "repo" / "data" / "dataset"
    prepare_dataset(SMALL, 0, out, tmp_path / "repo")
    doc = yaml.safe_load((out / "dataset.yaml").read_text())
    assert "path" not in doc and doc["train"] == "images/train"

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo_cfg"))
    from ultralytics.data import utils as yolo_utils

    # Fonts have nothing to do with path resolution, and fetching one would need the network.
    monkeypatch.setattr(yolo_utils, "check_font", lambda *a, **k: None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = yolo_utils.check_det_dataset(str(out / "dataset.yaml"))
    assert Path(data["train"]) == (out / "images" / "train").resolve()
    assert Path(data["train"]).is_dir() and Path(data["val"]).is_dir()
    assert data["nc"] == 5
    assert os.getcwd() == str(elsewhere)


def test_every_skipped_kind_is_warned_and_counted_per_split(tmp_path: Path) -> None:
    """An unknown category id (its image loses its only box) and a capped calib split are said
    on the terminal and counted per split in the manifest."""
    base = tmp_path / "coco"
    (base / "annotations").mkdir(parents=True)
    images = []
    (base / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(base / "img" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 20, "height": 20})
    anns = [{"image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in range(3)]
    cats = [{"id": 1, "name": "cat"}]
    (base / "annotations" / "t.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    val_anns = [*anns[:2], {"image_id": 2, "category_id": 7, "bbox": [2, 2, 10, 10]}]
    (base / "annotations" / "v.json").write_text(
        json.dumps({"images": images, "annotations": val_anns, "categories": cats}))
    cfg = DataConfig(source="coco", path="coco", coco_train_json="annotations/t.json",
                     coco_val_json="annotations/v.json", coco_train_images="img",
                     coco_val_images="img", train_images=3, val_images=3, calib_images=5)
    with pytest.warns(DataWarning) as caught:
        manifest = prepare_dataset(cfg, 0, tmp_path / "dataset", tmp_path)
    said = sorted(str(w.message) for w in caught)
    assert said == [
        "calib: data.calib_images=5 but the train split has 3 images; calib holds 3",
        "coco val: skipped 1 images without usable boxes",
        "coco val: skipped 1 unknown categories",
        # both JSONs list the same folder: 2 of the val images are train images
        ("data: 2 of 2 val images are also train images (2 the same file, 2 the same content); "
        "val scores will overstate the model"),
    ]
    assert manifest["train_val_overlap"] == {"val_images": 2, "same_file": 2, "same_content": 2}
    per_split = manifest["skipped_per_split"]
    assert per_split["val"]["unknown_categories"] == 1
    assert per_split["val"]["images_without_usable_boxes"] == 1
    assert sum(per_split["train"].values()) == 0
    assert per_split["calib"] == {"capped": 2}
    assert [manifest["splits"][s]["images"] for s in ("train", "val", "calib")] == [3, 2, 3]
    assert manifest["skipped"]["unknown_categories"] == 1


def _yolo_source(root: Path, val: str) -> Path:
    ds = root / "ds"
    for i in range(4):
        (ds / "images" / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (i * 50, 10, 10)).save(ds / "images" / "train" / f"t{i}.png")
        (ds / "labels" / "train").mkdir(parents=True, exist_ok=True)
        (ds / "labels" / "train" / f"t{i}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (ds / "images" / "val").mkdir(parents=True)
    # a copy of t0 under another name, and one image of its own
    (ds / "images" / "val" / "copy_of_t0.png").write_bytes((ds / "images" / "train" / "t0.png").read_bytes())
    Image.new("RGB", (24, 24), (0, 0, 250)).save(ds / "images" / "val" / "own.png")
    (ds / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": val, "names": ["a"]}))
    return ds / "data.yaml"


@pytest.mark.parametrize(("val", "overlap", "said"), [
    # `val: images/train`: every val image is a train file
    ("images/train", {"val_images": 2, "same_file": 2, "same_content": 2},
     ("data: 2 of 2 val images are also train images (2 the same file, 2 the same content); "
     "val scores will overstate the model")),
    # a byte-identical copy under another name
    ("images/val", {"val_images": 2, "same_file": 0, "same_content": 1},
     ("data: 1 of 2 val images are also train images (0 the same file, 1 the same content); "
     "val scores will overstate the model")),
])
def test_a_train_val_overlap_is_a_warning_with_counts_in_the_manifest(tmp_path, val, overlap, said):
    _yolo_source(tmp_path, val)
    cfg = DataConfig(source="yolo", path="ds/data.yaml", train_images=4, val_images=2, calib_images=2)
    with pytest.warns(DataWarning) as caught:
        manifest = prepare_dataset(cfg, 0, tmp_path / "dataset", tmp_path)
    assert [str(w.message) for w in caught] == [said]
    assert manifest["train_val_overlap"] == overlap
    assert json.loads((tmp_path / "dataset" / "manifest.json").read_text())["train_val_overlap"] == overlap


def test_no_overlap_is_no_warning_and_zero_counts(tmp_path, recwarn):
    ds = _yolo_source(tmp_path, "images/val").parent
    (ds / "images" / "val" / "copy_of_t0.png").unlink()
    cfg = DataConfig(source="yolo", path="ds/data.yaml", train_images=4, val_images=2, calib_images=2)
    manifest = prepare_dataset(cfg, 0, tmp_path / "dataset", tmp_path)
    assert [w for w in recwarn if issubclass(w.category, DataWarning)] == []
    assert manifest["train_val_overlap"] == {"val_images": 1, "same_file": 0, "same_content": 0}


def test_synthetic_manifest_has_no_overlap_block(tmp_path):
    """Its manifest stays byte-identical to earlier versions (a changed data/prepared would re-run
    every later stage); generated images never repeat."""
    assert "train_val_overlap" not in prepare_dataset(SMALL, 0, tmp_path / "d", tmp_path)


@pytest.mark.parametrize("bad_id", [None, "seven"])
def test_a_bad_category_id_no_longer_aborts_prepare(tmp_path, bad_id):
    """Was: `data: preparing the coco dataset failed (TypeError: int() argument ...)` (or a
    ValueError), naming neither the field nor the file."""
    base = tmp_path / "coco"
    (base / "img").mkdir(parents=True)
    (base / "annotations").mkdir()
    images = []
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(base / "img" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 20, "height": 20})
    anns = [{"image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in range(3)]
    cats = [{"id": 1, "name": "cat"}, {"id": bad_id, "name": "ghost"}]
    (base / "annotations" / "t.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    val = {"images": images[:1], "annotations": [{**anns[0], "category_id": bad_id}, anns[0]],
           "categories": cats}
    (base / "annotations" / "v.json").write_text(json.dumps(val))
    (base / "vimg").mkdir()
    Image.new("RGB", (20, 20), (0, 0, 200)).save(base / "vimg" / "0.jpg")
    cfg = DataConfig(source="coco", path="coco", coco_train_json="annotations/t.json",
                     coco_val_json="annotations/v.json", coco_train_images="img",
                     coco_val_images="vimg", train_images=3, val_images=1, calib_images=2)
    with pytest.warns(DataWarning) as caught:
        manifest = prepare_dataset(cfg, 0, tmp_path / "dataset", tmp_path)
    said = sorted(str(w.message) for w in caught)
    shown = repr(bad_id)
    assert f"coco train: skipped 1 malformed categories (categories[1].id={shown}) in t.json" in said
    assert f"coco val: skipped 1 malformed categories (categories[1].id={shown}) in v.json" in said
    assert f"coco val: skipped 1 malformed annotations (annotations[0].category_id={shown}) in v.json" in said
    assert manifest["names"] == {"0": "cat"}
    assert manifest["skipped"]["malformed_categories"] == 2
    assert manifest["skipped_per_split"]["val"]["malformed_annotations"] == 1
