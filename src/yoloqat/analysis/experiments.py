"""Read this repo's DVC experiments as flat records, and their per-epoch curves.

``dvc exp show --json`` (dvc 3.x) prints a list of rows: the ``workspace``, then one row per
baseline commit whose ``experiments`` is a list of groups ``{"name", "executor", "revs"}``;
``revs[0]`` is the experiment itself.  Each row's ``data`` holds
``params["params.yaml"]["data"]`` and ``metrics[<file>]`` as ``{"data": {...}}`` or
``{"error": {...}}`` (file missing at that revision).  The group's ``executor.state`` is
``queued`` / ``running`` / ``success`` / ``failed`` for queued runs and ``null`` for runs
made with a plain ``dvc exp run``; a failed run also has ``error`` on its row.

:func:`read_experiments` turns that into :class:`ExpRecord` objects; :func:`read_series`
reads a DVCLive TSV at an experiment's git revision (the plots are git-tracked,
``cache: false``) with ``git show REV:PATH``, or from the working tree for the workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoloqat.config import apply_preset, set_dotted
from yoloqat.curves.reader import DVCLIVE_MAP, on_epochs, parse_tsv, steps_up_to
from yoloqat.errors import ConfigError, CurveError, ExperimentsError
from yoloqat.paths import (
    DVCLIVE_PLOTS,
    EVALUATE_METRICS,
    FP_CONTROL_METRICS,
    FP_METRICS,
    FP_RESULTS,
    PARAMS,
    QAT_METRICS,
    QAT_RESULTS,
    QC_METRICS,
    VERDICT_METRICS,
)
from yoloqat.provenance import unwrap_metrics

PARAMS_FILE = PARAMS.as_posix()
METRIC_FILES = {
    "qat": QAT_METRICS.as_posix(),
    "qc": QC_METRICS.as_posix(),
    "verdict": VERDICT_METRICS.as_posix(),
    "evaluate": EVALUATE_METRICS.as_posix(),
    "train_fp": FP_METRICS.as_posix(),
    "fp_control": FP_CONTROL_METRICS.as_posix(),
}
PARAM_KEYS = ("model", "ema", "qc", "seed", "qat.bits", "qat.init")
MAP_TSV = (QAT_RESULTS / DVCLIVE_MAP).as_posix()
LIVE_TSV = (QAT_RESULTS / DVCLIVE_PLOTS / "val_live" / "mAP50-95.tsv").as_posix()
EMA_TSV = (QAT_RESULTS / DVCLIVE_PLOTS / "val_ema" / "mAP50-95.tsv").as_posix()
BNRE_TSV = (QAT_RESULTS / DVCLIVE_PLOTS / "val_bnre" / "mAP50-95.tsv").as_posix()
OSC_TSV = (QAT_RESULTS / DVCLIVE_PLOTS / "osc" / "frac_oscillating.tsv").as_posix()
FP_MAP_TSV = (FP_RESULTS / DVCLIVE_MAP).as_posix()

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
            "metrics": self.metrics, "error": self.error,
        }


# --------------------------------------------------------------------------------------------
# running dvc


def dvc_command() -> list[str]:
    """The dvc executable next to this Python (a venv), else on PATH, else ``python -m dvc``."""
    sibling = Path(sys.executable).parent / "dvc"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    found = shutil.which("dvc")
    return [found] if found else [sys.executable, "-m", "dvc"]


def dvc_env() -> dict[str, str]:
    """The environment for dvc: its own folder first on PATH (queue workers start ``dvc`` by
    name), analytics off."""
    env = dict(os.environ)
    exe = Path(dvc_command()[0])
    if exe.name == "dvc":
        env["PATH"] = str(exe.parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_dvc(args: list[str], repo: str | Path = ".", timeout: float = 600) -> str:
    """Run ``dvc ARGS`` in ``repo``; stdout, or ExperimentsError with dvc's last error line."""
    cmd = [*dvc_command(), *args]
    try:
        res = subprocess.run(
            cmd, cwd=repo, capture_output=True, text=True, timeout=timeout, env=dvc_env(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ExperimentsError(f"dvc {' '.join(args)} could not run: {exc}") from None
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
        raise ExperimentsError(
            f"dvc {' '.join(args)} failed in {repo} (exit {res.returncode}): {errors[-1]}"
        )
    return res.stdout


# --------------------------------------------------------------------------------------------
# exp show JSON -> records


def load_exp_show(
    repo: str | Path = ".", json_file: str | Path | None = None, all_commits: bool = True
) -> list[dict[str, Any]]:
    """The parsed ``dvc exp show --json`` (``-A``: experiments of every commit, not only
    HEAD's), or a recorded copy of it from ``json_file``."""
    if json_file is not None:
        try:
            text = Path(json_file).read_text()
        except OSError as exc:
            raise ExperimentsError(f"{json_file} cannot be read: {exc.strerror}") from None
        source = str(json_file)
    else:
        args = ["exp", "show", "--json"]
        if all_commits:
            args.append("--all-commits")
        text = run_dvc(args, repo)
        source = "dvc exp show --json"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExperimentsError(f"{source} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, list):
        raise ExperimentsError(f"{source} is not a dvc exp show --json list of rows")
    return raw


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


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
        return flatten(apply_preset(nested(params)))
    except ConfigError:
        return dict(params)


def _params(data: dict[str, Any]) -> dict[str, Any]:
    """Every params.yaml value of the run as dotted keys; PARAM_KEYS are always present."""
    block = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
    return {**dict.fromkeys(PARAM_KEYS), **flatten(block)}


def _metrics(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    files = data.get("metrics") or {}
    out: dict[str, dict[str, Any]] = {}
    for key, path in METRIC_FILES.items():
        entry = files.get(path)
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            out[key] = unwrap_metrics(entry["data"])
    return out


def _error_text(err: Any) -> str | None:
    if not err:
        return None
    if isinstance(err, dict):
        return str(err.get("msg") or err.get("type") or "error")
    return str(err)


def _record(row: dict[str, Any], kind: str, baseline: str | None, state: str | None) -> ExpRecord:
    if not isinstance(row, dict):
        raise ExperimentsError("dvc exp show --json: a row is not an object")
    data = row.get("data") or {}
    rev = str(row.get("rev") or data.get("rev") or "")
    error = _error_text(row.get("error"))
    metrics = _metrics(data)
    if state is None:  # plain `dvc exp run`, a baseline commit or the workspace
        state = FAILED if error else DONE
    elif state == "success":
        state = DONE
    elif state not in PENDING:
        state = FAILED
    name = row.get("name") or (rev if kind == "workspace" else rev[:7])
    return ExpRecord(
        name=str(name), rev=rev, kind=kind, state=state, baseline=baseline,
        timestamp=data.get("timestamp"), params=_params(data), metrics=metrics, error=error,
    )


def flatten_exp_show(raw: list[dict[str, Any]]) -> list[ExpRecord]:
    """One record per workspace, baseline commit and experiment, in dvc's order."""
    records: list[ExpRecord] = []
    for row in raw:
        if not isinstance(row, dict):
            raise ExperimentsError("dvc exp show --json: a row is not an object")
        rev = str(row.get("rev") or "")
        kind = "workspace" if rev == "workspace" else "baseline"
        records.append(_record(row, kind, None, None))
        for group in row.get("experiments") or []:
            revs = group.get("revs") or [] if isinstance(group, dict) else []
            if not revs:
                continue
            executor = group.get("executor") or {}
            state = executor.get("state") if isinstance(executor, dict) else None
            records.append(_record(revs[0], "experiment", rev, state))
    return records


def read_experiments(
    repo: str | Path = ".", json_file: str | Path | None = None, all_commits: bool = True
) -> list[ExpRecord]:
    return flatten_exp_show(load_exp_show(repo, json_file, all_commits))


# --------------------------------------------------------------------------------------------
# per-epoch curves at a revision


def read_text_at(repo: str | Path, rev: str, path: str) -> str | None:
    """A git-tracked file at ``rev`` (the working tree for ``workspace``); None if absent."""
    if rev == "workspace":
        p = Path(repo) / path
        return p.read_text() if p.is_file() else None
    try:
        res = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True,
            timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def read_series(repo: str | Path, rev: str, path: str) -> list[float] | None:
    """The values of a DVCLive TSV at ``rev``, one per step 0 .. last (the curve reader's rule:
    a missing or non-finite step is NaN); None if absent or unreadable."""
    text = read_text_at(repo, rev, path)
    if text is None:
        return None
    try:
        by_step = parse_tsv(text, f"{rev[:7]}:{path}")
    except CurveError:
        return None
    return on_epochs(by_step, steps_up_to(by_step))


def read_curves(record: ExpRecord, repo: str | Path = ".") -> dict[str, list[float] | None]:
    """The per-epoch curves the report plots: ``map`` (the deployed val mAP50-95), ``live`` and
    ``ema`` (the paired curves; None for runs made before they were logged), ``bnre`` (the
    deployed model after BN re-estimation; None unless qat.bn_reestimate was on), ``osc``
    (osc/frac_oscillating) and ``fp_map`` (the FP baseline's val mAP50-95)."""
    return {
        "map": read_series(repo, record.rev, MAP_TSV),
        "live": read_series(repo, record.rev, LIVE_TSV),
        "ema": read_series(repo, record.rev, EMA_TSV),
        "bnre": read_series(repo, record.rev, BNRE_TSV),
        "osc": read_series(repo, record.rev, OSC_TSV),
        "fp_map": read_series(repo, record.rev, FP_MAP_TSV),
    }
