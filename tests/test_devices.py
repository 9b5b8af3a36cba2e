"""device / evaluate.device are checked against what torch sees, before a stage runs: a device
this machine lacks is one line naming what it has, never a traceback from Ultralytics."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO
from yoloqat.config_checks import parse_device
from yoloqat.errors import ConfigError
from yoloqat.pipeline.devices import check_devices

FORMS = "cpu, a CUDA index N, a list N,M, cuda, cuda:N or mps"


@pytest.fixture
def machine(monkeypatch):
    """torch as this test wants it: ``machine(gpus=[...], mps=False)``; no real CUDA is touched."""
    import torch

    def set_up(gpus: list[str], mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpus[i])
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_up


def refusal(key: str, value: str) -> str:
    with pytest.raises(ConfigError) as err:
        check_devices([(key, value)])
    return str(err.value)


@pytest.mark.parametrize(("value", "parsed"), [
    ("cpu", ("cpu", ())), ("CPU", ("cpu", ())), ("mps", ("mps", ())), ("0", ("cuda", (0,))),
    ("7", ("cuda", (7,))), ("0,1", ("cuda", (0, 1))), ("0, 1", ("cuda", (0, 1))),
    ("cuda", ("cuda", (0,))), ("cuda:1", ("cuda", (1,))),
    ("banana", None), ("0,0", None), ("-1", None), ("cuda:", None), ("cuda:0,1", None), ("", None),
])
def test_parse_device_reads_the_allowed_forms_only(value, parsed):
    assert parse_device(value) == parsed


@pytest.mark.parametrize(("key", "value", "why"), [
    ("device", "7", "is not available (torch sees no CUDA device)"),
    ("device", "cuda:0", "is not available (torch sees no CUDA device)"),
    ("device", "0,1", "is not available (torch sees no CUDA device)"),
    ("device", "mps", "is not available (torch has no MPS device)"),
    ("device", "banana", f"is not allowed; expected {FORMS}"),
    ("evaluate.device", "cuda", "is not available (torch sees no CUDA device)"),
])
def test_a_cpu_machine_refuses_every_gpu_in_one_line(machine, key, value, why):
    machine(gpus=[])
    assert refusal(key, value) == f"params: {key}={value!r} {why}; this machine has: cpu"


def test_cpu_is_accepted_without_importing_torch():
    code = ("import sys; from yoloqat.pipeline.devices import check_devices; "
            "check_devices([('device', 'cpu'), ('evaluate.device', 'cpu')]); "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert res.stdout == "False\n"


@pytest.mark.parametrize("value", ["cpu", "0", "cuda", "cuda:0", "cuda:1", "1", "0,1", "1,0"])
def test_a_two_gpu_machine_accepts_its_gpus(machine, value):
    machine(gpus=["NVIDIA H200", "NVIDIA H200"])
    check_devices([("device", value), ("evaluate.device", "cuda")])


@pytest.mark.parametrize(("value", "why"), [
    ("1", "no CUDA device 1"), ("0,1", "no CUDA device 1"), ("cuda:3", "no CUDA device 3"),
    ("2,3", "no CUDA device 2, 3"),
])
def test_a_one_gpu_machine_names_the_missing_index_and_its_gpu(machine, value, why):
    machine(gpus=["NVIDIA H200"])
    assert refusal("device", value) == (
        f"params: device={value!r} is not available ({why}); this machine has: cpu, 0 (NVIDIA H200)"
    )


def test_mps_is_accepted_where_torch_has_it_and_listed(machine):
    machine(gpus=[], mps=True)
    check_devices([("device", "mps")])
    assert refusal("device", "0") == (
        "params: device='0' is not available (torch sees no CUDA device); this machine has: cpu, mps"
    )


def test_the_first_bad_key_is_the_one_named(machine):
    machine(gpus=[])
    with pytest.raises(ConfigError, match=r"^params: evaluate\.device='cuda' "):
        check_devices([("device", "cpu"), ("evaluate.device", "cuda"), ("device", "banana")])
