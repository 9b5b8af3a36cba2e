"""The experiment source: runs (name, params, metrics, per-epoch curves) from DVC or an archive.

Two loaders give the same :class:`ExpRecord` objects, so every table (ladder, search,
remedies) is computed identically from either:

* :func:`read_experiments`: this repo's DVC experiments (``dvc exp show --json``); their curves
  are read when asked (:func:`run_curves`), at the experiment's revision, with DVC's file system
  (``dvc.api.DVCFileSystem``: git-tracked and DVC-cached outputs alike);
* :func:`read_archive`: a folder of ``yoloqat archive`` files (one JSON per run, schema
  :data:`ARCHIVE_SCHEMA`), which carry their curves, so a study's evidence is in git and its
  tables regenerate without the experiments, their DVC cache or this machine.

``dvc exp show --json`` (dvc 3.x) prints a list of rows: the ``workspace``, then one row per
baseline commit whose ``experiments`` is a list of groups ``{"name", "executor", "revs"}``;
``revs[0]`` is the experiment itself.  Each row's ``data`` holds
``params["params.yaml"]["data"]`` and ``metrics[<file>]`` as ``{"data": {...}}`` or
``{"error": {...}}`` (file missing at that revision).  The group's ``executor.state`` is
``queued`` / ``running`` / ``success`` / ``failed`` for queued runs and ``null`` for runs
made with a plain ``dvc exp run``; a failed run also has ``error`` on its row.

:func:`read_experiments` turns that into :class:`ExpRecord` objects.  A run's curves are every
DVCLive TSV of its qat, train_fp and fp_control folders, by DVCLive name, put on the run's epochs
by the curve reader's one rule (:func:`yoloqat.curves.reader.on_run_epochs`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoloqat.config import apply_preset, set_dotted
from yoloqat.curves.keys import (
    BNRE,
    DVCLIVE_PLOTS,
    EMA,
    LIVE,
    OSC_FRACTION,
    PRIMARY,
    TSV_SUFFIX,
    is_tsv,
    series_of_tsv,
    tsv_of,
)
from yoloqat.curves.reader import on_run_epochs, parse_tsv
from yoloqat.errors import ConfigError, CurveError, ExperimentsError
from yoloqat.paths import (
    EVALUATE_METRICS,
    EXPORT_METRICS,
    FP_CONTROL_METRICS,
    FP_CONTROL_RESULTS,
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
    "export": EXPORT_METRICS.as_posix(),
}
# the DVCLive folders whose curves a run carries, by stage
LIVE_FOLDERS = {"qat": QAT_RESULTS, "train_fp": FP_RESULTS, "fp_control": FP_CONTROL_RESULTS}
Curves = dict[str, dict[str, list[float]]]  # stage -> DVCLive name -> one value per epoch
PARAM_KEYS = ("model", "ema", "qc", "seed", "qat.bits", "qat.init")
MAP_TSV = tsv_of(QAT_RESULTS, PRIMARY)
LIVE_TSV = tsv_of(QAT_RESULTS, LIVE)
EMA_TSV = tsv_of(QAT_RESULTS, EMA)

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


# What makes a run's *setting* (the ladder pools seeds of one setting; search describes a run by
# its setting's params away from the defaults): every param except those that say how a run
# executes (the device; qat.fake_quant, per layer or batched, gives the same forward, and runs
# from before the param existed record none) or how the tools report it (evaluate.*, ladder.*).
NOT_SETTING = frozenset({"device", "qat.fake_quant"})
NOT_SETTING_PREFIXES = ("evaluate.", "ladder.")


def is_setting_param(key: str) -> bool:
    """Whether a dotted param is part of a run's setting (see :data:`NOT_SETTING`)."""
    return key not in NOT_SETTING and not key.startswith(NOT_SETTING_PREFIXES)


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


def _repo_fs(repo: str | Path, rev: str) -> Any:
    """A read-only view of the repo at ``rev``: git-tracked files and DVC-cached outputs (None
    when DVC cannot open that revision)."""
    from dvc.api import DVCFileSystem

    try:
        return DVCFileSystem(str(repo), rev=rev)
    except Exception:  # noqa: BLE001 (any dvc / scm failure means: nothing readable there)
        return None


def _tsv_texts(repo: str | Path, rev: str, folder: Path, fs: Any) -> dict[str, str]:
    """``{DVCLive name: TSV text}`` of ``folder/plots/metrics`` at ``rev`` (the working tree for
    ``workspace``); unreadable files are left out."""
    base = folder / DVCLIVE_PLOTS
    texts: dict[str, str] = {}
    if rev == "workspace":
        root = Path(repo) / base
        for f in sorted(root.rglob("*" + TSV_SUFFIX)) if root.is_dir() else []:
            try:
                texts[series_of_tsv(f.relative_to(root).as_posix())] = f.read_text()
            except (OSError, UnicodeDecodeError):
                continue
        return texts
    if fs is None:
        return texts
    try:
        found = fs.find(base.as_posix()) if fs.isdir(base.as_posix()) else []
    except Exception:  # noqa: BLE001
        return texts
    for path in sorted(found):
        rel = Path(str(path).lstrip("/")).relative_to(base).as_posix()
        if not is_tsv(rel):
            continue
        try:
            texts[series_of_tsv(rel)] = fs.read_text(path)
        except Exception:  # noqa: BLE001, S112 (a cached output whose object is not in the cache)
            continue
    return texts


def read_stage_curves(repo: str | Path, rev: str) -> Curves:
    """Every DVCLive curve of a run at ``rev``: ``{stage: {DVCLive name: values}}`` for the
    stages of :data:`LIVE_FOLDERS` that logged any, on each stage's epochs (the curve reader's
    rule).  A TSV that cannot be parsed is left out."""
    fs = None if rev == "workspace" else _repo_fs(repo, rev)
    out: Curves = {}
    for stage, folder in LIVE_FOLDERS.items():
        parsed = {}
        for name, text in _tsv_texts(repo, rev, folder, fs).items():
            try:
                parsed[name] = parse_tsv(text, f"{rev[:7]}:{tsv_of(folder, name)}")
            except CurveError:
                continue
        if parsed:
            out[stage] = on_run_epochs(parsed)
    return out


def run_curves(record: ExpRecord, repo: str | Path = ".") -> Curves:
    """A run's curves: carried by the record (an archive) or read at its revision."""
    return record.curves if record.curves is not None else read_stage_curves(repo, record.rev)


def curves_view(curves: Curves) -> dict[str, list[float] | None]:
    """The per-epoch curves the reports plot, from a run's curves: ``map`` (the deployed val
    mAP50-95), ``live`` and ``ema`` (the paired curves; None for runs made before they were
    logged), ``bnre`` (the deployed model after BN re-estimation; None unless
    qat.bn_reestimate was on), ``osc`` (osc/frac_oscillating) and ``fp_map`` (the FP baseline's
    val mAP50-95)."""
    qat, fp = curves.get("qat", {}), curves.get("train_fp", {})

    def pick(block: dict[str, list[float]], name: str) -> list[float] | None:
        values = block.get(name)
        return list(values) if values is not None else None

    return {"map": pick(qat, PRIMARY), "live": pick(qat, LIVE), "ema": pick(qat, EMA),
            "bnre": pick(qat, BNRE), "osc": pick(qat, OSC_FRACTION), "fp_map": pick(fp, PRIMARY)}


def read_curves(record: ExpRecord, repo: str | Path = ".") -> dict[str, list[float] | None]:
    """:func:`curves_view` of the run's curves (from its archive file, or read at its rev)."""
    return curves_view(run_curves(record, repo))


# --------------------------------------------------------------------------------------------
# the archive: one JSON file per run (written by analysis/archive.py)

ARCHIVE_SCHEMA = 1
ARCHIVE_STATES = (DONE, FAILED)


def _archive_error(where: str, what: str, allowed: str) -> ExperimentsError:
    return ExperimentsError(f"{where}: {what} is not allowed; expected {allowed}")


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _check_curves(where: str, curves: Any, state: str) -> Curves:
    allowed = ("curves as {stage: {DVCLive name: [number or null per epoch]}} with qat's "
               f"{PRIMARY} for a done run (write it again with yoloqat archive)")
    if not isinstance(curves, dict):
        raise _archive_error(where, "curves=" + ("missing" if curves is None else repr(type(curves).__name__)),
                             allowed)
    out: Curves = {}
    for stage, block in curves.items():
        if not isinstance(block, dict):
            raise _archive_error(where, f"curves.{stage}={type(block).__name__}", allowed)
        out[stage] = {}
        for name, values in block.items():
            ok = isinstance(values, list) and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
            if not ok:
                raise _archive_error(where, f"curves.{stage}.{name}", allowed)
            out[stage][name] = [_nan(v) for v in values]
    if state == DONE and not out.get("qat", {}).get(PRIMARY):
        raise _archive_error(where, f"a done run without curves.qat.{PRIMARY} (missing curves)",
                             allowed)
    return out


def record_from_archive(doc: Any, where: str) -> ExpRecord:
    """One archive file's JSON as a record; ExperimentsError (one line) when it is not one."""
    if not isinstance(doc, dict):
        raise _archive_error(where, "a JSON " + type(doc).__name__, "an object written by yoloqat archive")
    schema = doc.get("schema")
    if schema != ARCHIVE_SCHEMA:
        raise _archive_error(where, f"schema={schema!r}",
                             f"schema {ARCHIVE_SCHEMA} (written by yoloqat archive of this version)")
    for key in ("name", "commit"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise _archive_error(where, f"{key}={doc.get(key)!r}", "a non-empty string")
    state = doc.get("state")
    if state not in ARCHIVE_STATES:
        raise _archive_error(where, f"state={state!r}", " | ".join(ARCHIVE_STATES))
    params, metrics = doc.get("params"), doc.get("metrics")
    if not isinstance(params, dict):
        raise _archive_error(where, f"params={params!r}", "a mapping of dotted keys")
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise _archive_error(where, "metrics", "a mapping stage -> that stage's metrics.json")
    curves = _check_curves(where, doc.get("curves"), state)
    return ExpRecord(
        name=doc["name"], rev=doc["commit"], kind="experiment", state=state,
        baseline=doc.get("baseline"), timestamp=doc.get("timestamp"),
        params={**dict.fromkeys(PARAM_KEYS), **params}, metrics=metrics, error=doc.get("error"),
        curves=curves,
    )


def read_archive(folder: str | Path) -> list[ExpRecord]:
    """Every run archived in ``folder`` (``yoloqat archive``: one ``<name>.json`` each), by name;
    ExperimentsError (one line, naming the file) on anything else."""
    folder = Path(folder)
    allowed = "a folder of yoloqat archive files (<experiment>.json)"
    if not folder.is_dir():
        raise _archive_error(f"--from {folder}", "a path that is not a folder", allowed)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise _archive_error(f"--from {folder}", "a folder without .json files", allowed)
    records = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ExperimentsError(f"{f}: cannot be read ({type(exc).__name__})") from None
        except json.JSONDecodeError as exc:
            raise ExperimentsError(f"{f}: is not JSON ({exc.msg} at line {exc.lineno}); "
                                   "expected a yoloqat archive file") from None
        records.append(record_from_archive(doc, str(f)))
    return records


def load_runs(repo: str | Path = ".", json_file: str | Path | None = None,
              archive: str | Path | None = None, all_commits: bool = True) -> list[ExpRecord]:
    """The runs the reports read: an archive folder when given, else the repo's DVC experiments
    (or a saved ``dvc exp show --json``)."""
    if archive is not None:
        return read_archive(archive)
    return read_experiments(repo, json_file, all_commits)
