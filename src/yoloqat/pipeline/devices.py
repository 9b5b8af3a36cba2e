"""The devices params.yaml names (``device``, ``evaluate.device``), checked against this machine.

Ultralytics refuses a device it cannot use only once training starts, with a multi-line
traceback; an ``mps`` it cannot use it silently replaces with the CPU.  The source stage (the
first of dvc.yaml) and every stage that runs on a device check the value first, so a
``-S device=7`` on a CPU machine stops in one line that names what this machine has:
``params: device='7' is not available (torch sees no CUDA device); this machine has: cpu``;
on a machine with one GPU it ends ``this machine has: cpu, 0 (NVIDIA H200)``.

Allowed forms of ``device``: ``cpu``, a CUDA index ``N``, a list ``N,M`` (DDP), ``cuda`` or
``cuda:N`` (one GPU), and ``mps`` (Apple's GPU) where torch has it.  ``evaluate.device`` is
``cpu`` or ``cuda`` (config.py); ``cuda`` needs a CUDA device that torch sees.  CUDA indices are
torch's (relative to ``CUDA_VISIBLE_DEVICES``), as Ultralytics reads them.

torch is imported only to check a value other than ``cpu``: the default params never load it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from yoloqat.config_checks import FORMS, parse_device
from yoloqat.errors import ConfigError


def machine_devices(torch: Any) -> list[str]:
    """What this machine offers, as a user would write it: ``cpu``, ``0 (NVIDIA H200)``, ``mps``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        found += [f"{i} ({torch.cuda.get_device_name(i)})" for i in range(count)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def _missing(kind: str, indices: tuple[int, ...], torch: Any) -> str | None:
    """Why this machine cannot run ``kind``/``indices``; None when it can."""
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else "torch has no MPS device"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = [i for i in indices if i >= count]
    if not absent:
        return None
    if count == 0:
        return "torch sees no CUDA device"
    return f"no CUDA device {', '.join(map(str, absent))}"


def check_devices(named: Iterable[tuple[str, str]]) -> None:
    """Raise ConfigError (one line) for the first ``(params key, value)`` this machine cannot run.

    ``evaluate.device`` values go through the same parse: ``cuda`` means CUDA device 0.
    """
    for key, value in named:
        parsed = parse_device(value)
        if parsed == ("cpu", ()):
            continue
        import torch

        if parsed is None:
            problem = f"is not allowed; expected {FORMS}"
        else:
            reason = _missing(*parsed, torch)
            if reason is None:
                continue
            problem = f"is not available ({reason})"
        has = ", ".join(machine_devices(torch))
        raise ConfigError(f"params: {key}={value!r} {problem}; this machine has: {has}")


def stage_devices(cfg: Any, keys: Iterable[str]) -> list[tuple[str, str]]:
    """``(key, value)`` for each dotted params key in ``keys`` (``device``, ``evaluate.device``)."""
    out = []
    for key in keys:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        out.append((key, str(value)))
    return out
