"""The synthetic generator: deterministic, and actually as varied as the training needs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from yoloqat.data import DataError, content_hash, generate_synthetic
from yoloqat.data.scene import _rasterize
from yoloqat.data.shapes import SHAPES

LINE = re.compile(r"^\d+ (\d\.\d{6}) (\d\.\d{6}) (\d\.\d{6}) (\d\.\d{6})$")


def _generate(out: Path, seed: int, train: int = 8, **kw) -> dict:
    args = {"val_images": 4, "calib_images": 4, "imgsz": 128, "num_classes": 6}
    args.update(kw)
    return generate_synthetic(out, seed=seed, train_images=train, **args)


def _labels(out: Path, split: str = "train") -> list[tuple[int, float, float, float, float]]:
    rows = []
    for f in sorted((out / "labels" / split).glob("*.txt")):
        for line in f.read_text().splitlines():
            c, *xywh = line.split()
            rows.append((int(c), *map(float, xywh)))
    return rows


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "ds"
    return out, _generate(out, seed=3, train=160)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    _generate(tmp_path / "a", seed=7)
    _generate(tmp_path / "b", seed=7)
    _generate(tmp_path / "c", seed=8)
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b")
    assert content_hash(tmp_path / "a") != content_hash(tmp_path / "c")


def test_images_do_not_depend_on_split_size(tmp_path: Path) -> None:
    # Per-image seeding: growing the split must keep the first images identical.
    _generate(tmp_path / "small", seed=1, train=3)
    _generate(tmp_path / "large", seed=1, train=6)
    for name in ("train_00000.jpg", "train_00002.jpg"):
        small = (tmp_path / "small" / "images" / "train" / name).read_bytes()
        assert small == (tmp_path / "large" / "images" / "train" / name).read_bytes()


def test_layout_and_yaml(big: tuple[Path, dict]) -> None:
    out, stats = big
    for split, n in (("train", 160), ("val", 4), ("calib", 4)):
        images = sorted((out / "images" / split).glob("*.jpg"))
        labels = sorted((out / "labels" / split).glob("*.txt"))
        assert len(images) == n == stats["splits"][split]["images"]
        assert [p.stem for p in images] == [p.stem for p in labels]
    with Image.open(out / "images" / "train" / "train_00000.jpg") as im:
        assert im.size == (128, 128) and im.mode == "RGB"
    text = (out / "dataset.yaml").read_text()
    assert "path:" not in text and "nc: 6" in text and "calib: images/calib" in text


def test_label_lines_are_normalised_boxes(big: tuple[Path, dict]) -> None:
    out, stats = big
    files = sorted((out / "labels" / "train").glob("*.txt"))
    assert len(files) == 160  # one label file per train image: the loop below is not vacuous
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert len(lines) == stats["splits"]["train"]["instances"] > 0
    for f in files:
        for line in f.read_text().splitlines():
            m = LINE.match(line)
            assert m, line
            cx, cy, w, h = map(float, m.groups())
            assert 0 < w <= 1 and 0 < h <= 1
            assert -1e-6 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6
            assert -1e-6 <= cy - h / 2 and cy + h / 2 <= 1 + 1e-6


def test_content_is_varied(big: tuple[Path, dict]) -> None:
    out, stats = big
    rows = _labels(out)
    classes = {r[0] for r in rows}
    assert len(classes) >= 5 and max(classes) < 6
    train = stats["splits"]["train"]
    assert 1 <= train["negatives"] <= 0.2 * 160
    assert train["instances"] == len(rows)
    assert sum(train["per_class"].values()) == len(rows)
    # negatives are empty label files, not missing ones
    empty = [f for f in (out / "labels" / "train").glob("*.txt") if not f.read_text()]
    assert len(empty) == train["negatives"]
    counts = [len(f.read_text().splitlines()) for f in (out / "labels" / "train").glob("*.txt")]
    assert max(counts) <= 8 and max(counts) >= 5
    longest = np.array([max(r[3], r[4]) * 128 for r in rows])
    assert longest.min() <= 10, "needs small objects (~8 px at 128)"
    assert longest.max() >= 0.55 * 128, "needs large objects"
    assert np.mean(longest < 16) > 0.05 and np.mean(longest > 40) > 0.05
    ratios = np.array([r[3] / r[4] for r in rows])
    assert ratios.min() < 0.6 and ratios.max() > 1.6


def test_class_is_not_colour(big: tuple[Path, dict]) -> None:
    # Mean colour inside each small box, per class: the spread within a class must be wide.
    out, _ = big
    by_class: dict[int, list[np.ndarray]] = {}
    for f in sorted((out / "labels" / "train").glob("*.txt"))[:60]:
        with Image.open(out / "images" / "train" / f"{f.stem}.jpg") as im:
            px = np.asarray(im, dtype=np.float32)
        for line in f.read_text().splitlines():
            c, cx, cy, w, h = (float(v) for v in line.split())
            x0, x1 = int((cx - w / 4) * 128), math.ceil((cx + w / 4) * 128)
            y0, y1 = int((cy - h / 4) * 128), math.ceil((cy + h / 4) * 128)
            by_class.setdefault(int(c), []).append(px[y0:y1, x0:x1].reshape(-1, 3).mean(0))
    spreads = [np.stack(v).std(axis=0).mean() for v in by_class.values() if len(v) >= 5]
    assert spreads and min(spreads) > 30


def test_rasterize_covers_the_polygon_exactly() -> None:
    square = np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 20.0], [10.0, 20.0]])
    cov, x0, y0 = _rasterize([(square, True)])
    assert cov.sum() == pytest.approx(200.0, rel=0.05)
    ys, xs = np.nonzero(cov > 0.5)
    assert (xs.min() + x0, xs.max() + x0 + 1, ys.min() + y0, ys.max() + y0 + 1) == (10, 30, 10, 20)


def test_difficulty_zero_is_cleaner(tmp_path: Path) -> None:
    easy = _generate(tmp_path / "easy", seed=2, train=40, difficulty=0.0)
    hard = _generate(tmp_path / "hard", seed=2, train=40, difficulty=2.0)
    assert easy["splits"]["train"]["hidden_dropped"] < hard["splits"]["train"]["hidden_dropped"]


@pytest.mark.parametrize(
    "kw", [{"num_classes": len(SHAPES) + 1}, {"imgsz": 16}, {"difficulty": -1}]
)
def test_bad_arguments_raise_data_error(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(DataError):
        _generate(tmp_path / "x", seed=0, **kw)
