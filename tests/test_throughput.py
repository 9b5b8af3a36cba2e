"""EpochTimer: the batch loop's images/s, the warm-up epoch left out of the median."""

from __future__ import annotations

from types import SimpleNamespace

from yoloqat.train.throughput import EpochTimer


def _trainer(images: int):
    return SimpleNamespace(train_loader=SimpleNamespace(dataset=[0] * images))


def test_median_of_the_epochs_after_the_first():
    ticks = iter([0.0, 10.0, 20.0, 22.0, 30.0, 34.0, 40.0, 41.0])  # loops of 10, 2, 4, 1 s
    timer = EpochTimer(clock=lambda: next(ticks))
    t = _trainer(800)
    for _ in range(4):
        timer.on_train_epoch_start(t)
        timer.on_train_epoch_end(t)
    # 800 images over 2, 4 and 1 s: 400, 200, 800 img/s; median 400 (the 10 s warm-up is out)
    assert timer.summary() == {"train_loop_images_per_s": 400.0, "first_epoch_loop_s": 10.0}


def test_one_epoch_is_its_own_rate_and_none_is_empty():
    ticks = iter([0.0, 4.0])
    timer = EpochTimer(clock=lambda: next(ticks))
    assert timer.summary() == {}
    timer.on_train_epoch_end(_trainer(8))  # an end without a start is ignored
    timer.on_train_epoch_start(_trainer(8))
    timer.on_train_epoch_end(_trainer(8))
    assert timer.summary() == {"train_loop_images_per_s": 2.0, "first_epoch_loop_s": 4.0}
