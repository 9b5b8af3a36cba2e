"""GPU-facing options that must work (or be refused) without a GPU: workers, determinism, the
image cache, AMP without Ultralytics' downloading check."""

from __future__ import annotations

import ast
import inspect
import socket
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import REPO, default_params
from yoloqat.config import load_config
from yoloqat.offline import configure_offline
from yoloqat.train.overrides import device_is_cuda, resolve_workers, ultralytics_overrides

configure_offline()


# --------------------------------------------------------------------------------------------
# workers, deterministic, cache -> Ultralytics args


@pytest.mark.parametrize(
    ("workers", "device", "cores", "expected"),
    [(0, "0", 32, 0), (3, "cpu", 32, 3), ("auto", "cpu", 32, 0), ("auto", "0", 32, 8),
     ("auto", "0,1", 4, 4), ("auto", "cuda:1", 16, 8), ("auto", "0", 1, 1)],
)
def test_resolve_workers(workers, device, cores, expected):
    assert resolve_workers(workers, device, cpu_count=cores) == expected


def test_device_is_cuda():
    assert not device_is_cuda("cpu") and not device_is_cuda("CPU") and not device_is_cuda("mps")
    assert device_is_cuda("0") and device_is_cuda("0,1") and device_is_cuda("cuda:0")


def _overrides(tmp_path, monkeypatch, **changes):
    import yaml

    raw = default_params()
    raw.update(changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "params.yaml")
    monkeypatch.setattr("yoloqat.train.overrides.require_dataset", lambda: tmp_path / "d.yaml")
    return ultralytics_overrides(
        cfg, model="yolov10n.yaml", epochs=1, batch=2, optimizer="SGD", lr0=0.01,
        weight_decay=0.0, warmup_epochs=0.0, workers="auto", project=str(tmp_path), name="x",
    )


def test_overrides_pass_deterministic_cache_and_resolved_workers(tmp_path, monkeypatch):
    default = _overrides(tmp_path, monkeypatch)
    assert default["deterministic"] is True and default["cache"] is False
    assert default["workers"] == 0 and default["amp"] is False  # cpu: auto -> 0
    changed = _overrides(tmp_path, monkeypatch, deterministic=False, cache="ram", device=0)
    assert changed["deterministic"] is False and changed["cache"] == "ram"
    import os

    assert changed["workers"] == min(8, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# AMP on CUDA without Ultralytics' yolo26n.pt check


class _FakeCudaModel:
    """What check_amp reads of a model: the device of its first parameter."""

    def parameters(self):
        yield SimpleNamespace(device=torch.device("cuda", 0))


@pytest.fixture
def no_network_and_a_cuda_h200(monkeypatch):
    """Every way Ultralytics' check could fetch yolo26n.pt is blocked and recorded."""
    import ultralytics
    from ultralytics.utils import downloads

    calls: list[str] = []

    def blocked(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise ConnectionError(f"network blocked in tests ({name})")
        return f

    monkeypatch.setattr(socket.socket, "connect", blocked("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", blocked("socket.create_connection"))
    monkeypatch.setattr(downloads, "safe_download", blocked("safe_download"))
    monkeypatch.setattr(downloads, "attempt_download_asset", blocked("attempt_download_asset"))
    monkeypatch.setattr(ultralytics, "YOLO", blocked("YOLO(yolo26n.pt)"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H200")
    return calls


def test_ultralytics_check_amp_would_fetch_a_checkpoint_on_cuda(no_network_and_a_cuda_h200):
    """The control: with a (mocked) CUDA device, Ultralytics' own check loads yolo26n.pt."""
    from ultralytics.utils.checks import check_amp

    check_amp(_FakeCudaModel())
    assert no_network_and_a_cuda_h200  # it tried


def _bare_name_calls(func) -> set[str]:
    """Names ``func`` calls as plain names (``check_amp(...)``, not ``checks.check_amp(...)``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    return {
        node.func.id for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }


def test_offline_amp_check_grants_amp_on_cuda_without_any_download(no_network_and_a_cuda_h200):
    import ultralytics.engine.trainer as engine
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import checks

    from yoloqat.train.offline_setup import offline_amp_check, offline_check_amp

    # The patch only works while Ultralytics' set-up looks ``check_amp`` up in its trainer
    # module's globals: the binding exists, is Ultralytics' check, and the _setup_train the
    # project's trainers inherit calls it by that bare name (an upgrade that renames it, or calls
    # it through another module, fails here rather than silently downloading yolo26n.pt).
    assert engine.check_amp is checks.check_amp
    setup = DetectionTrainer._setup_train
    assert setup.__globals__ is vars(engine)
    assert "check_amp" in _bare_name_calls(setup)

    original = engine.check_amp
    with offline_amp_check():
        assert engine.check_amp is offline_check_amp
        assert engine.check_amp(_FakeCudaModel()) is True
    assert engine.check_amp is original
    assert no_network_and_a_cuda_h200 == []


def test_offline_amp_check_refuses_the_gpus_ultralytics_refuses(no_network_and_a_cuda_h200, monkeypatch):
    from yoloqat.train.offline_setup import offline_check_amp

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA GeForce GTX 1660")
    assert offline_check_amp(_FakeCudaModel()) is False
    assert offline_check_amp(torch.nn.Conv2d(1, 1, 1)) is False  # CPU
    assert no_network_and_a_cuda_h200 == []


def _setup_train_probe(monkeypatch, model):
    """Ultralytics' _setup_train replaced by what matters here: its call of check_amp."""
    import ultralytics.engine.trainer as engine
    from ultralytics.models.yolo.detect import DetectionTrainer

    seen = {}

    def fake_setup(self):
        seen["amp"] = engine.check_amp(model) if self.args.amp else False

    monkeypatch.setattr(DetectionTrainer, "_setup_train", fake_setup)
    return seen


@pytest.mark.parametrize("cls_name", ["FPTrainer", "QATTrainer"])
def test_trainers_set_up_amp_on_cuda_without_downloading(
    no_network_and_a_cuda_h200, monkeypatch, capsys, cls_name
):
    import yoloqat.train.trainer as tr

    seen = _setup_train_probe(monkeypatch, _FakeCudaModel())
    trainer = object.__new__(getattr(tr, cls_name))
    trainer.args = SimpleNamespace(amp=True)
    trainer.device = torch.device("cuda", 0)
    trainer._setup_train()
    assert seen["amp"] is True
    assert no_network_and_a_cuda_h200 == []
    assert "amp: fp16 autocast + GradScaler on NVIDIA H200" in capsys.readouterr().out


def test_amp_on_cpu_says_so_in_one_line(monkeypatch, capsys):
    from yoloqat.train.trainer import FPTrainer

    seen = _setup_train_probe(monkeypatch, torch.nn.Conv2d(1, 1, 1))
    trainer = object.__new__(FPTrainer)
    trainer.args = SimpleNamespace(amp=True)
    trainer.device = torch.device("cpu")
    trainer._setup_train()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("amp:")]
    assert lines == [
        "amp: requested, but the device is CPU: Ultralytics does not autocast there; training in fp32"
    ]
    assert seen["amp"] is False


# --------------------------------------------------------------------------------------------
# cache: disk keeps its .npy files out of data/prepared


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from yoloqat.data import generate_synthetic

    out = tmp_path_factory.mktemp("data")
    generate_synthetic(out, seed=0, train_images=4, val_images=2, calib_images=1, imgsz=64, num_classes=6)
    return out / "dataset.yaml"


def test_disk_cache_goes_to_the_state_folder_not_next_to_the_images(tiny_dataset, tmp_path, monkeypatch):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import base
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from yoloqat.train.offline_setup import redirect_disk_cache

    data = check_det_dataset(str(tiny_dataset))
    args = get_cfg(overrides={"imgsz": 64, "cache": False})
    ds = build_yolo_dataset(args, data["train"], 2, data, mode="train")
    redirect_disk_cache(ds, tmp_path / "cache")
    assert sorted(tmp_path.joinpath("cache").glob("*.npy")) == sorted(ds.npy_files)
    assert len(ds.npy_files) == len(ds.im_files) == 4
    assert not list(tiny_dataset.parent.rglob("*.npy"))
    # training reads the cached arrays, not the images
    monkeypatch.setattr(base, "imread", lambda *a, **k: pytest.fail("read an image, not the cache"))
    im, _, _ = ds.load_image(0)
    assert im.shape[:2] == (64, 64)


def test_trainer_builds_the_dataset_uncached_then_caches_to_disk_cache_dir(monkeypatch):
    from ultralytics.models.yolo.detect import DetectionTrainer

    import yoloqat.train.trainer as tr

    seen = {}

    def fake_build(self, img_path, mode="train", batch=None):
        seen["cache_during_build"] = self.args.cache
        return "dataset"

    monkeypatch.setattr(DetectionTrainer, "build_dataset", fake_build)
    monkeypatch.setattr(tr, "redirect_disk_cache", lambda ds, folder: seen.update(ds=ds, folder=folder))
    trainer = object.__new__(tr.FPTrainer)
    trainer.args = SimpleNamespace(cache="disk")
    assert trainer.build_dataset("images/train") == "dataset"
    assert seen == {"cache_during_build": False, "ds": "dataset", "folder": tr.disk_cache_dir()}
    assert trainer.args.cache == "disk"
    assert Path(tr.disk_cache_dir()).name == "image_cache"


def test_gpu_check_without_cuda_is_one_line_and_exit_0():
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check would run the whole check")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py")], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0
    assert res.stdout.splitlines() == [
        "gpu-check: no CUDA device (torch.cuda.is_available() is false); nothing run"
    ]
