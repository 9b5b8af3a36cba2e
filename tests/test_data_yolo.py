"""Importing an existing Ultralytics dataset: paths resolved like Ultralytics, bad items counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from yoloqat.data import DataError, DataWarning, import_yolo
from yoloqat.data.yolo import label_path_for, parse_label_line


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (10, 200, 90)).save(path)


def _label(path: Path, *lines: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A dataset in ds/, described by a yaml in another folder with a relative ``path``."""
    ds = tmp_path / "ds"
    for stem in ("t0", "t1", "t2", "t3", "t4"):
        _image(ds / "images" / "train" / f"{stem}.jpg")
    _label(
        ds / "labels" / "train" / "t0.txt",
        "0 0.5 0.5 0.25 0.25",
        "0 0.5 0.5 0.2",  # four numbers
        "2 0.5 0.5 0.1 0.1",  # class out of range
        "1 1.5 0.5 0.1 0.1",  # centre outside [0, 1]
        "1 0.5 0.5 0 0.1",  # zero width
        "x 0.5 0.5 0.1 0.1",  # not a number
    )
    _label(ds / "labels" / "train" / "t1.txt", "1 0.1 0.2 0.3 0.4")
    # t2: no label file at all -> background image
    _label(ds / "labels" / "train" / "t3.txt")  # empty -> background image
    _label(ds / "labels" / "train" / "t4.txt", "7 0.5 0.5 0.1 0.1")  # annotated, all bad
    (ds / "images" / "train" / "bad.jpg").write_bytes(b"garbage" * 20)
    _label(ds / "labels" / "train" / "bad.txt", "0 0.5 0.5 0.1 0.1")
    _image(ds / "images" / "val" / "v0.png")
    _label(ds / "labels" / "val" / "v0.txt", "1 0.5 0.5 1 1")
    (ds / "val.txt").write_text("./images/val/v0.png\n")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    names = {0: "cat", 1: "dog"}
    doc = {"path": "../ds", "train": "images/train", "val": "val.txt", "names": names}
    (cfg / "data.yaml").write_text(yaml.safe_dump(doc))
    return cfg / "data.yaml"


def test_parse_label_line() -> None:
    assert parse_label_line("1 0.5 0.25 0.1 0.2", 2) == "1 0.500000 0.250000 0.100000 0.200000"
    assert parse_label_line("1.0 0.5 0.25 0.1 0.2", 2) is not None
    for bad in ("1.5 0.5 0.5 0.1 0.1", "-1 0.5 0.5 0.1 0.1", "0 nan 0.5 0.1 0.1", "0 0.1 0.1 0.1"):
        assert parse_label_line(bad, 2) is None, bad


def test_label_path_rule(tmp_path: Path) -> None:
    img = tmp_path / "images" / "x" / "images" / "train" / "a.jpg"
    assert label_path_for(img) == tmp_path / "images" / "x" / "labels" / "train" / "a.txt"


def test_import_skips_and_counts(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.warns(DataWarning) as caught:
        stats = import_yolo(source, out, max_train=100, max_val=100, calib=2, seed=0)
    text = " | ".join(str(w.message) for w in caught)
    assert "1 unreadable images (bad.jpg)" in text
    # five bad lines in t0.txt (line 1 is fine) plus t4.txt's only line
    assert "6 malformed label lines (" in text and "t0.txt:2" in text and "t4.txt:1" in text
    assert stats["names"] == ["cat", "dog"]
    assert stats["skipped"] == {
        "unreadable_images": 1,
        "malformed_label_lines": 6,
        "unreadable_label_files": 0,
        "images_without_usable_boxes": 1,
    }
    train = stats["splits"]["train"]
    assert (train["images"], train["instances"], train["negatives"]) == (4, 2, 2)
    assert train["per_class"] == {"cat": 1, "dog": 1}
    assert (out / "labels" / "train" / "t0.txt").read_text() == (
        "0 0.500000 0.500000 0.250000 0.250000\n"
    )
    assert (out / "labels" / "train" / "t2.txt").read_text() == ""
    assert not (out / "images" / "train" / "bad.jpg").exists()
    assert stats["splits"]["val"]["images"] == 1
    assert (out / "images" / "val" / "v0.png").is_file()
    calib = sorted(p.name for p in (out / "images" / "calib").iterdir())
    assert len(calib) == 2 and set(calib) <= {p.name for p in (out / "images" / "train").iterdir()}
    doc = yaml.safe_load((out / "dataset.yaml").read_text())
    assert doc == {
        "train": "images/train",
        "val": "images/val",
        "calib": "images/calib",
        "nc": 2,
        "names": {0: "cat", 1: "dog"},
    }


@pytest.mark.filterwarnings("ignore::yoloqat.data.errors.DataWarning")
def test_import_limit_is_seeded(tmp_path: Path) -> None:
    # 30 images, 5 kept: C(30, 5) = 142506 possible subsets, so seeds that mattered would differ
    ds = tmp_path / "many"
    for i in range(30):
        _image(ds / "images" / "train" / f"t{i:02d}.jpg")
        _label(ds / "labels" / "train" / f"t{i:02d}.txt", "0 0.5 0.5 0.25 0.25")
    _image(ds / "images" / "val" / "v0.png")
    _label(ds / "labels" / "val" / "v0.txt", "0 0.5 0.5 1 1")
    doc = {"path": str(ds), "train": "images/train", "val": "images/val", "names": {0: "cat"}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(doc))
    picks = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4), ("d", 5)):
        import_yolo(tmp_path / "data.yaml", tmp_path / name, max_train=5, max_val=1, calib=1, seed=seed)
        picks[name] = tuple(sorted(p.name for p in (tmp_path / name / "images" / "train").iterdir()))
    assert all(len(p) == 5 for p in picks.values())
    assert picks["a"] == picks["b"]  # same seed, same subset
    assert len({picks["a"], picks["c"], picks["d"]}) == 3, picks  # other seeds, other subsets
    first = tuple(f"t{i:02d}.jpg" for i in range(5))
    assert picks["a"] != first  # a draw, not the first files in order


def test_bad_yaml_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        import_yolo(tmp_path / "none.yaml", tmp_path / "out", 1, 1, 1, 0)
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "nowhere", "val": "x", "nc": 1}))
    with pytest.raises(DataError, match="train path"):
        import_yolo(tmp_path / "d.yaml", tmp_path / "out", 1, 1, 1, 0)
