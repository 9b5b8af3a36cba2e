"""``yoloqat archive EXP... --to reports/<study>/runs/``: a study's evidence, committed and regenerable.

DVC experiments live in git refs and the local DVC cache: ``dvc exp gc``, another clone or another
machine loses them, and with them the tables a report was written from.  This writes, per
experiment, one small JSON file (schema :data:`~yoloqat.analysis.archive_reader.ARCHIVE_SCHEMA`)::

    {"schema": 1, "name": "fs-collapse-s0", "commit": "<the experiment's git revision>",
     "baseline": "<the commit it ran from>", "timestamp": "...", "state": "done", "error": null,
     "params": {"model": "yolo10n", "qat.scale_weight_decay": 0.05, "seed": 0, ...},
     "metrics": {"qat": {...}, "verdict": {...}, ...},
     "curves": {"qat": {"val_ema/mAP50-95": [0.171, ...], ...}, "train_fp": {...}, ...}}

``params``: every param of the run's params.yaml as a dotted key, the preset applied (the values
it ran with); ``metrics``: every stage's metrics.json; ``curves``: every DVCLive series of the
qat, train_fp and fp_control folders by its DVCLive name, one value per epoch (``null`` where the
curve reader's rule gives NaN).  ``yoloqat ladder / search / remedies --from <folder>`` read these
files instead of DVC (:func:`yoloqat.analysis.archive_reader.read_archive`) and compute the same
tables.

Nothing is written unless every named experiment is known, finished, and archives into a file
that reads back; a bad input is one line (ExperimentsError).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yoloqat.analysis.archive_reader import ARCHIVE_SCHEMA, ARCHIVE_STATES, record_from_archive
from yoloqat.analysis.exp_curves import run_curves
from yoloqat.analysis.experiments import baselines_of, read_experiments
from yoloqat.analysis.records import Curves, ExpRecord, resolved_params
from yoloqat.analysis.search import select
from yoloqat.errors import ExperimentsError

MAX_BYTES = 50_000  # what a file is meant to stay under (a 20-epoch run: ~20 kB)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def archive_doc(rec: ExpRecord, curves: Curves) -> dict[str, Any]:
    """One run's archive content (see the module docstring)."""
    return {
        "schema": ARCHIVE_SCHEMA,
        "name": rec.name,
        "commit": rec.rev,
        "baseline": rec.baseline,
        "timestamp": rec.timestamp,
        "state": rec.state,
        "error": rec.error,
        "params": _finite(dict(sorted(resolved_params(rec.params).items()))),
        "metrics": _finite({stage: rec.metrics[stage] for stage in sorted(rec.metrics)}),
        "curves": _finite({stage: dict(sorted(block.items())) for stage, block in sorted(curves.items())}),
    }


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with one key per line and every list on one line (a curve is one line in a diff)."""
    if isinstance(value, dict) and value:
        pad = " " * (indent + 1)
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(value, allow_nan=False)


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if not _SAFE_NAME.match(name):
            raise ExperimentsError(
                f"experiment name {name!r} is not allowed; expected a DVC experiment name "
                "(letters, digits, '.', '_', '-'), which is also the archive file's name")


def _check_writable(to: Path) -> None:
    """``to`` is a folder this process can write into, or can be created (nothing is created)."""
    allowed = "a folder that can be written (it is created if missing)"
    if to.exists() and not to.is_dir():
        raise ExperimentsError(f"--to {to} is not allowed; it is a file; expected {allowed}")
    probe = to.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "is not a folder" if not probe.is_dir() else "is not writable"
        raise ExperimentsError(f"--to {to} is not allowed; {probe} {what}; expected {allowed}")


def archive_runs(
    names: Sequence[str], to: str | Path, repo: str | Path = ".",
    records: Sequence[ExpRecord] | None = None,
) -> list[tuple[Path, int]]:
    """Archive the named experiments into ``to``; ``(file, bytes)`` per run, in order.

    ``records``: the experiments to pick from (default: this repo's, from the commits the named
    experiments were run from).
    Every check runs before the first file is written."""
    to = Path(to)
    names = list(dict.fromkeys(names))
    _check_names(names)
    _check_writable(to)
    if records is None:
        # only the commits the named experiments came from; a name DVC does not list falls
        # through to every commit's experiments, and select() names what is missing
        revs = baselines_of(names, repo)
        records = read_experiments(repo, all_commits=not revs, revs=revs)
    chosen = select(records, names)
    texts = []
    for rec in chosen:
        if rec.state not in ARCHIVE_STATES:
            raise ExperimentsError(
                f"experiment {rec.name} is {rec.state}; expected a finished experiment "
                f"({' | '.join(ARCHIVE_STATES)}): archive it once it has run")
        text = dumps(archive_doc(rec, run_curves(rec, repo))) + "\n"
        # what is written must read back (a done run without its QAT curves does not)
        record_from_archive(json.loads(text), f"experiment {rec.name} at {rec.rev[:7]}")
        texts.append((rec.name, text))
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExperimentsError(f"--to {to} is not allowed ({exc.strerror}); expected a folder "
                               "that can be written") from None
    written = []
    for name, text in texts:
        path = to / f"{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append((path, len(text.encode())))
    return written
