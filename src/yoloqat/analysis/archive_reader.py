"""Reading a study's archive: a folder of ``yoloqat archive`` files, one JSON per run
(written by :mod:`yoloqat.analysis.archive`), as :class:`~yoloqat.analysis.records.ExpRecord`
objects that carry their curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from yoloqat.analysis.records import DONE, FAILED, PARAM_KEYS, Curves, ExpRecord
from yoloqat.curves.keys import PRIMARY
from yoloqat.errors import ExperimentsError

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
