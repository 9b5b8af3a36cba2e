"""The runs of this repo's DVC experiments, as :class:`~yoloqat.analysis.records.ExpRecord`.

``dvc exp show --json`` (dvc 3.x) prints a list of rows: the ``workspace``, then one row per
baseline commit whose ``experiments`` is a list of groups ``{"name", "executor", "revs"}``;
``revs[0]`` is the experiment itself.  Each row's ``data`` holds
``params["params.yaml"]["data"]`` and ``metrics[<file>]`` as ``{"data": {...}}`` or
``{"error": {...}}`` (file missing at that revision).  The group's ``executor.state`` is
``queued`` / ``running`` / ``success`` / ``failed`` for queued runs and ``null`` for runs
made with a plain ``dvc exp run``; a failed run also has ``error`` on its row.

:func:`read_experiments` turns that into records; :func:`load_runs` picks the source the reports
read (an archive folder, :mod:`yoloqat.analysis.archive_reader`, or the DVC experiments).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yoloqat.analysis.archive_reader import read_archive
from yoloqat.analysis.records import (
    DONE,
    FAILED,
    PARAM_KEYS,
    PENDING,
    ExpRecord,
    flatten,
)
from yoloqat.errors import ExperimentsError
from yoloqat.paths import (
    EVALUATE_METRICS,
    EXPORT_METRICS,
    FP_CONTROL_METRICS,
    FP_METRICS,
    PARAMS,
    QAT_METRICS,
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


def baselines_of(names: Sequence[str], repo: str | Path = ".") -> list[str]:
    """The commits the named experiments were run from, from DVC's experiment list over every
    commit (fast: no metrics are read), so that ``dvc exp show`` reads only those commits'
    experiments instead of every commit's (``-A``, minutes on a long history)."""
    from dvc.repo import Repo

    wanted = set(names)
    with Repo(str(repo)) as dvc_repo:
        listing = dvc_repo.experiments.ls(all_commits=True)
    # an entry is (name, sha) in DVC 3.x, a bare name in older versions
    return sorted(base for base, exps in listing.items()
                  if wanted & {e if isinstance(e, str) else e[0] for e in exps})


def load_exp_show(
    repo: str | Path = ".", json_file: str | Path | None = None, all_commits: bool = True,
    revs: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The parsed ``dvc exp show --json`` (``-A``: experiments of every commit, not only
    HEAD's; else those of ``revs``, or of HEAD when none), or a recorded copy of it from
    ``json_file``."""
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
        else:
            for rev in revs:
                args += ["--rev", rev]
        text = run_dvc(args, repo)
        source = "dvc exp show --json"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExperimentsError(f"{source} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, list):
        raise ExperimentsError(f"{source} is not a dvc exp show --json list of rows")
    return raw


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
    repo: str | Path = ".", json_file: str | Path | None = None, all_commits: bool = True,
    revs: Sequence[str] = (),
) -> list[ExpRecord]:
    return flatten_exp_show(load_exp_show(repo, json_file, all_commits, revs))


def load_runs(repo: str | Path = ".", json_file: str | Path | None = None,
              archive: str | Path | Sequence[str | Path] | None = None,
              all_commits: bool = True) -> list[ExpRecord]:
    """The runs the reports read: the archive folder(s) when given (a study's runs and, say, the
    control runs of another study; a name archived in two of them is an error), else the repo's
    DVC experiments (or a saved ``dvc exp show --json``)."""
    if archive is None:
        return read_experiments(repo, json_file, all_commits)
    folders = [archive] if isinstance(archive, (str, Path)) else list(archive)
    records: list[ExpRecord] = []
    seen: dict[str, str | Path] = {}
    for folder in folders:
        for rec in read_archive(folder):
            if rec.name in seen:
                raise ExperimentsError(
                    f"--from {folder}: experiment {rec.name!r} is also archived in --from "
                    f"{seen[rec.name]}; each experiment may be read once"
                )
            seen[rec.name] = folder
            records.append(rec)
    return records
