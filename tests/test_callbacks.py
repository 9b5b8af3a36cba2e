"""``yoloqat.callbacks.add_qat_monitor`` on plain Ultralytics training (no project trainer)."""

from __future__ import annotations

import csv
import json

import pytest

from yoloqat.offline import configure_offline

configure_offline()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from yoloqat.data import generate_synthetic

    out = tmp_path_factory.mktemp("data")
    generate_synthetic(
        out, seed=0, train_images=16, val_images=8, calib_images=4, imgsz=64, num_classes=6
    )
    return out / "dataset.yaml"


def _train(dataset, project, name, monitor_kwargs=None):
    from ultralytics import YOLO

    from yoloqat.callbacks import add_qat_monitor

    model = YOLO("yolov10n.yaml")
    monitor = add_qat_monitor(model, **monitor_kwargs) if monitor_kwargs is not None else None
    model.train(
        data=str(dataset),
        epochs=1,
        imgsz=64,
        batch=8,
        device="cpu",
        workers=0,
        plots=False,
        project=str(project),
        name=name,
        seed=0,
        deterministic=True,
        verbose=False,
    )
    return model.trainer, monitor


class _FakeLive:
    def __init__(self):
        self.logged = {}

    def log_metric(self, key, value):
        self.logged[key] = value


def test_monitor_logs_every_epoch_and_leaves_a_plain_yolo_training_unchanged(
    tiny_dataset, tmp_path, monkeypatch
):
    """A plain (unquantized) YOLOv10n, 1 epoch: the monitor measures the BN mismatch of the live
    and EMA models on both image sets (no weight series: no quantized convs), re-estimates the
    EMA's BN before validation and puts its statistics back, writes CSV + JSON into save_dir
    and logs to Ultralytics' DVCLive when that is active; the weights and EMA it leaves are
    bit-identical to a training without it."""
    from ultralytics.utils.callbacks import dvc

    plain, _ = _train(tiny_dataset, tmp_path, "plain")
    live = _FakeLive()
    monkeypatch.setattr(dvc, "live", live, raising=False)
    trainer, monitor = _train(
        tiny_dataset, tmp_path, "monitored", {"batches": 1, "bn_reestimate": 1}
    )

    for got, want in ((trainer.model, plain.model), (trainer.ema.ema, plain.ema.ema)):
        want_sd = want.state_dict()
        assert all(v.equal(want_sd[k]) for k, v in got.state_dict().items())

    assert len(monitor.history) == 1
    row = monitor.history[0]
    groups = {  # mismatch and variance floor, and the 5 output series on the plain images
        "mech_live": 6 + 5,
        "mech_ema": 6 + 5,
        "mech_live_aug": 4,
        "mech_ema_aug": 4,
        "mech_ema_bnre": 6 + 5,
        "mech_ema_bnre_aug": 4,
    }
    for group, count in groups.items():
        assert len([k for k in row if k.startswith(group + "/")]) == count, group
    assert not any("clipped" in k or "scale_ratio" in k for k in row)  # plain convs
    assert row["mech_ema/bn_logvar_mean"] > 0
    # re-estimated on the plain images it is then measured on (1 batch): BN statistics of the
    # model's own input, up to the unbiased/biased variance and the propagation in eval mode
    assert row["mech_ema_bnre/bn_mean_shift_mean"] < row["mech_ema/bn_mean_shift_mean"]
    assert live.logged == {k: v for k, v in row.items() if k != "epoch"}

    save_dir = trainer.save_dir
    rows = list(csv.DictReader((save_dir / "qat_monitor.csv").open()))
    assert (
        len(rows) == 1
        and float(rows[0]["mech_ema/bn_logvar_mean"]) == row["mech_ema/bn_logvar_mean"]
    )
    doc = json.loads((save_dir / "qat_monitor.json").read_text())
    assert doc["quant_layers"] == [] and len(doc["bn_layers"]) > 50
    assert doc["epochs"][0]["sets"]["mech_ema"]["bn_logvar_worst_layer"] in doc["bn_layers"]


@pytest.mark.parametrize("kwargs", [{"batches": 0}, {"batches": 1.5}, {"bn_reestimate": -1}])
def test_monitor_rejects_bad_counts_in_one_line(kwargs):
    from yoloqat.callbacks import add_qat_monitor

    class Target:
        def add_callback(self, *_):
            raise AssertionError("registered despite a bad value")

    with pytest.raises(ValueError) as err:
        add_qat_monitor(Target(), **kwargs)
    ((name, value),) = kwargs.items()
    assert str(err.value).startswith(f"add_qat_monitor: {name}={value!r} is not allowed")


def test_augmented_draw_is_fixed_by_its_seed_and_leaves_the_random_state(tiny_dataset):
    import random
    from types import SimpleNamespace

    import numpy as np
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG

    from yoloqat.train.mechanism import augmented_batches

    data = check_det_dataset(str(tiny_dataset))
    cfg = get_cfg(DEFAULT_CFG, {"imgsz": 64, "mosaic": 1.0})
    trainer = SimpleNamespace(
        data=data,
        batch_size=4,
        build_dataset=lambda path, mode, batch: build_yolo_dataset(
            cfg, path, batch, data, mode=mode, stride=32
        ),
    )
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first = augmented_batches(trainer, 2, seed=0)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    assert [(b.dtype, tuple(b.shape)) for b in first] == [(torch.uint8, (4, 3, 64, 64))] * 2
    again = augmented_batches(trainer, 2, seed=0)
    assert all(a.equal(b) for a, b in zip(first, again, strict=True))
    assert not all(
        a.equal(b) for a, b in zip(first, augmented_batches(trainer, 2, seed=1), strict=True)
    )
