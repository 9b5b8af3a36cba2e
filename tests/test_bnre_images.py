"""yoloqat bnre-images: BN re-estimation of a checkpoint on three image sets of the training split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import yoloqat.quant.checkpoint  # noqa: F401 (torch/brevitas import-time warnings print here, not in a test's stderr)
from yoloqat.analysis.bnre_images import IMAGE_SETS, BnreImagesRow, bnre_images_table, image_batches
from yoloqat.cli import main
from yoloqat.config import DataConfig

TINY = DataConfig(train_images=8, val_images=4, calib_images=2, imgsz=64, num_classes=6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from yoloqat.data import prepare_dataset

    root = tmp_path_factory.mktemp("bnre-images")
    prepare_dataset(TINY, 0, root / "prepared", root)
    return str(root / "prepared" / "dataset.yaml")


def test_each_image_set_has_the_geometry_it_names(dataset):
    """letterbox: imgsz square, as the repair curves' loader; val geometry: the validator's rect
    batch, padded by half a stride (64 px -> 96 px); augmented: imgsz square, different pixels."""
    from itertools import islice

    from yoloqat.train.validation import calibration_batches

    first = {s: next(image_batches(s, dataset, 64, 4)) for s in IMAGE_SETS}
    assert {s: tuple(x.shape) for s, x in first.items()} == {
        "letterbox": (4, 3, 64, 64), "val geometry": (4, 3, 96, 96), "augmented": (4, 3, 64, 64)}
    repair = next(islice(iter(calibration_batches(dataset, 64, 4, split="train")), 1))["img"]
    assert torch.equal(first["letterbox"], repair.float() / 255)
    assert not torch.equal(first["augmented"], first["letterbox"])
    assert all(0.0 <= float(x.min()) and float(x.max()) <= 1.0 for x in first.values())
    # seeded: the augmented batches are the same on every call
    assert torch.equal(next(image_batches("augmented", dataset, 64, 4)), first["augmented"])
    with pytest.raises(ValueError, match="unknown image set 'plain'"):
        next(image_batches("plain", dataset, 64, 4))


def test_table_rows_and_mean_change_exact():
    shapes = {"letterbox": (96, 96), "val geometry": (128, 128), "augmented": (96, 96)}
    rows = [BnreImagesRow("a.qat.pt", 0.25, {"letterbox": 0.125, "val geometry": 0.25, "augmented": 0.5}, shapes),
            BnreImagesRow("b.qat.pt", 0.5, {"letterbox": 0.25, "val geometry": 0.5, "augmented": 0.5}, shapes)]
    lines = bnre_images_table(rows).splitlines()
    assert lines[0] == "| checkpoint | as saved | BNre on letterbox | BNre on val geometry | BNre on augmented |"
    assert lines[2] == "| a.qat.pt | 0.2500 | 0.1250 | 0.2500 | 0.5000 |"
    assert lines[4] == "| mean change (2) | - | -0.1875 | +0.0000 | +0.1250 |"
    assert lines[-1] == ("Image size of each set (height x width): letterbox 96 x 96, "
                         "val geometry 128 x 128, augmented 96 x 96.")


def test_a_checkpoint_is_scored_as_saved_and_after_each_reestimation(dataset, tmp_path, one_torch_thread):
    from ultralytics.nn.tasks import DetectionModel

    from yoloqat.analysis.bnre_images import probe_checkpoint
    from yoloqat.quant.checkpoint import load_qat_checkpoint, save_qat_checkpoint
    from yoloqat.quant.convert import QuantRecipe, quantize_model
    from yoloqat.train.validation import validate_model

    torch.manual_seed(0)
    model = quantize_model(DetectionModel("yolov10n.yaml", nc=6, verbose=False), QuantRecipe()).eval()
    save_qat_checkpoint(model, QuantRecipe(), tmp_path / "m", {"epoch": 1}, {i: str(i) for i in range(6)})
    row = probe_checkpoint(tmp_path / "m.qat.pt", dataset, 64, 4, batches=1)
    loaded, _ = load_qat_checkpoint(tmp_path / "m.qat.pt")
    assert row.saved == validate_model(loaded, dataset, 64, 8, "cpu")["mAP50-95"]
    assert set(row.reestimated) == set(IMAGE_SETS)
    assert row.shapes == {"letterbox": (64, 64), "val geometry": (96, 96), "augmented": (64, 64)}


@pytest.mark.parametrize("args, says", [
    (["--batches", "0"], "--batches must be >= 1, got 0"),
    (["--mosaic", "2"], "--mosaic must be in [0, 1], got 2.0"),
    (["--data", "missing.yaml"], "--data 'missing.yaml' is not a file"),
])
def test_bad_options_are_one_line_exit_2(dataset, tmp_path, capsys, args, says):
    argv = ["bnre-images", str(tmp_path / "x.qat.pt"), "--data", dataset, "--out", str(tmp_path / "t.md"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"yoloqat bnre-images: error: {says}"
    assert not (tmp_path / "t.md").exists()


def test_a_corrupt_checkpoint_is_one_line_exit_2_and_nothing_written(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.qat.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["bnre-images", str(bad), "--data", dataset, "--out", str(tmp_path / "t.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"yoloqat bnre-images: error: checkpoint {str(bad)!r}")
    assert not Path(tmp_path / "t.md").exists()
