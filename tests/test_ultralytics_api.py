"""The Ultralytics internals this project overrides, patches or calls unbound, as the installed
release has them.

pyproject.toml admits ``ultralytics>=8.4.190,<8.5`` and the lock pins 8.4.190; a patch release
may rename or re-sign a private method without notice.  When one of these fails, the trainer
subclasses (src/yoloqat/train/trainer.py), the offline AMP check, the safe loader or the
scorer would silently stop doing what they say: read the new Ultralytics code before widening
the range.
"""

from __future__ import annotations

import inspect
import re

import pytest

pytest.importorskip("ultralytics")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _trainer_classes():
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    return BaseTrainer, DetectionTrainer


# (method of DetectionTrainer, its parameter names): the methods FPTrainer / QATTrainer override
# and call through super(), with the arguments they pass.
OVERRIDDEN = [
    ("_setup_train", ["self"]),
    ("_handle_nan_recovery", ["self", "epoch"]),
    ("final_eval", ["self"]),
    ("save_model", ["self"]),
    ("optimizer_step", ["self"]),
    ("validate", ["self"]),
    ("build_optimizer", ["self", "model", "name", "lr", "momentum", "decay", "iterations"]),
    ("build_dataset", ["self", "img_path", "mode", "batch"]),
    ("get_model", ["self", "cfg", "weights", "verbose"]),
    ("label_loss_items", ["self", "loss_items", "prefix"]),
]


@pytest.mark.parametrize("name, params", OVERRIDDEN, ids=[n for n, _ in OVERRIDDEN])
def test_trainer_methods_the_project_overrides_keep_their_signature(name, params):
    _, detection_trainer = _trainer_classes()
    assert _params(getattr(detection_trainer, name)) == params


def test_the_training_loop_still_calls_the_overridden_hooks():
    """FPTrainer's divergence bookkeeping and final-eval flag only work while _do_train calls them."""
    base, _ = _trainer_classes()
    loop = inspect.getsource(base._do_train)
    for hook in (
        "_setup_train(",
        "_handle_nan_recovery(",
        "final_eval(",
        "optimizer_step(",
        "validate(",
        "save_model(",
    ):
        assert hook in loop, hook


def test_check_amp_is_looked_up_in_the_trainer_module_at_set_up():
    """offline_amp_check replaces ``ultralytics.engine.trainer.check_amp``: that binding must be
    what _setup_train calls, and the stand-in must take the same arguments."""
    import ultralytics.engine.trainer as engine

    from yoloqat.train.offline_setup import offline_check_amp

    assert callable(engine.check_amp)
    assert _params(engine.check_amp) == _params(offline_check_amp) == ["model"]
    assert re.search(r"(?<![.\w])check_amp\(", inspect.getsource(engine.BaseTrainer._setup_train))


def test_match_predictions_reads_only_iouv_from_its_validator():
    """deploy/scoring.py calls it unbound with a namespace holding only ``iouv``."""
    from ultralytics.models.yolo.detect.val import DetectionValidator

    fn = DetectionValidator.match_predictions
    assert _params(fn)[:4] == ["self", "pred_classes", "true_classes", "iou"]
    assert set(re.findall(r"self\.(\w+)", inspect.getsource(fn))) == {"iouv"}


def test_safe_loader_and_the_criterion_hook_exist():
    from ultralytics.nn.tasks import DetectionModel, torch_safe_load

    assert _params(torch_safe_load) == ["weight", "safe_only"]  # safeload passes safe_only=True
    assert _params(DetectionModel.init_criterion) == ["self"]  # DampenedCriterion wraps its result


def test_dataset_disk_cache_attributes_redirect_disk_cache_sets():
    from ultralytics.data.base import BaseDataset

    init = inspect.getsource(BaseDataset.__init__)
    for attr in ("self.npy_files", "self.im_files", "self.cache"):
        assert attr in init, attr
    assert _params(BaseDataset.cache_images) == ["self"]


def test_model_ema_takes_decay_and_tau():
    from ultralytics.utils.torch_utils import ModelEMA

    assert _params(ModelEMA.__init__)[:4] == ["self", "model", "decay", "tau"]
