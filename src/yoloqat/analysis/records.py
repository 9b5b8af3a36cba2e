"""The run record: what every loader of runs gives, and the params helpers that read it.

Two loaders give the same :class:`ExpRecord` objects, so every table (ladder, search,
remedies) is computed identically from either:

* :func:`yoloqat.analysis.experiments.read_experiments`: this repo's DVC experiments (``dvc exp
  show --json``); their curves are read when asked (:func:`yoloqat.analysis.exp_curves.run_curves`),
  at the experiment's revision, with DVC's file system (``dvc.api.DVCFileSystem``: git-tracked and
  DVC-cached outputs alike);
* :func:`yoloqat.analysis.archive_reader.read_archive`: a folder of ``yoloqat archive`` files (one
  JSON per run, schema :data:`~yoloqat.analysis.archive_reader.ARCHIVE_SCHEMA`), which carry their
  curves, so a study's evidence is in git and its tables regenerate without the experiments,
  their DVC cache or this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from yoloqat.config import Config, apply_preset, set_dotted
from yoloqat.errors import ConfigError

Curves = dict[str, dict[str, list[float]]]  # stage -> DVCLive name -> one value per epoch
PARAM_KEYS = ("model", "ema", "qc", "seed", "qat.bits", "qat.init")

# states of a record; "done" = the run finished (its metrics may still say diverged)
DONE, FAILED, QUEUED, RUNNING = "done", "failed", "queued", "running"
PENDING = (QUEUED, RUNNING)


@dataclass(frozen=True)
class ExpRecord:
    name: str  # experiment name, branch name, short rev, or "workspace"
    rev: str  # full git revision ("workspace" for the working tree)
    kind: str  # workspace | baseline | experiment
    state: str  # done | failed | queued | running
    baseline: str | None = None  # the commit an experiment was run from
    timestamp: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # PARAM_KEYS (dotted) -> value
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # METRIC_FILES keys
    error: str | None = None
    # the run's curves when its source carries them (an archive); None: read at ``rev``
    curves: Curves | None = None

    @property
    def verdict(self) -> dict[str, Any]:
        return self.metrics.get("verdict", {})

    @property
    def label(self) -> str | None:
        label = self.verdict.get("label")
        return label if isinstance(label, str) else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "rev": self.rev, "kind": self.kind, "state": self.state,
            "baseline": self.baseline, "timestamp": self.timestamp, "params": self.params,
            "metrics": self.metrics, "error": self.error, "curves": self.curves,
        }


def flatten(block: Any, prefix: str = "") -> dict[str, Any]:
    """A nested params mapping as dotted keys (lists stay values)."""
    if not isinstance(block, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in block.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"qat.bits": 4}`` -> ``{"qat": {"bits": 4}}`` (the inverse of :func:`flatten`)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        set_dotted(out, key, value)
    return out


def resolved_params(params: dict[str, Any]) -> dict[str, Any]:
    """A run's dotted params with its preset applied: the values it really ran with (params.yaml
    holds the preset's name and the defaults).  As recorded when the preset is unknown here."""
    try:
        # a param added after the run is at its default (a new param's default keeps the old
        # behaviour), so runs from before and after it compare as one setting
        return flatten(apply_preset(nested({**flatten(Config().as_dict()), **params})))
    except ConfigError:
        return dict(params)


# What makes a run's *setting* (the ladder pools seeds of one setting; search describes a run by
# its setting's params away from the defaults): every param except those that say how a run
# executes (the device; qat.fake_quant, per layer or batched, gives the same forward, and runs
# from before the param existed record none) or how the tools report it (evaluate.*, ladder.*).
# Nor the measurements scored on copies beside training (repair curves, mechanism metrics): runs
# with and without them train bit-identically (tests/test_trainer.py).
REPAIR_CURVE_PARAMS = frozenset({"qat.repair_curves", "qat.repair_every", "qat.repair_bn_batches"})
NOT_SETTING = frozenset({"device", "qat.fake_quant", "qat.mechanism_batches"}) | REPAIR_CURVE_PARAMS
NOT_SETTING_PREFIXES = ("evaluate.", "ladder.")


def is_setting_param(key: str) -> bool:
    """Whether a dotted param is part of a run's setting (see :data:`NOT_SETTING`)."""
    return key not in NOT_SETTING and not key.startswith(NOT_SETTING_PREFIXES)

