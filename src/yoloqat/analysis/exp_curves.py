"""A run's per-epoch curves: carried by its record (an archive) or read at its revision.

A run's curves are every DVCLive TSV of its qat, train_fp and fp_control folders, by DVCLive
name, put on the run's epochs by the curve reader's one rule
(:func:`yoloqat.curves.reader.on_run_epochs`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from yoloqat.analysis.records import Curves, ExpRecord, resolved_params
from yoloqat.config import REPAIR_CURVES
from yoloqat.curves.keys import (
    BNRE,
    DVCLIVE_PLOTS,
    EMA,
    LIVE,
    OSC_FRACTION,
    PRIMARY,
    TSV_SUFFIX,
    is_tsv,
    logged_repairs,
    repair_prefix,
    series_of_tsv,
    tsv_of,
)
from yoloqat.curves.reader import on_run_epochs, parse_tsv
from yoloqat.errors import CurveError
from yoloqat.paths import FP_CONTROL_RESULTS, FP_RESULTS, QAT_RESULTS

# the DVCLive folders whose curves a run carries, by stage
LIVE_FOLDERS = {"qat": QAT_RESULTS, "train_fp": FP_RESULTS, "fp_control": FP_CONTROL_RESULTS}
MAP_TSV = tsv_of(QAT_RESULTS, PRIMARY)
LIVE_TSV = tsv_of(QAT_RESULTS, LIVE)
FP_CONTROL_TSV = tsv_of(FP_CONTROL_RESULTS, PRIMARY)  # the FP-continued control's val curve
EMA_TSV = tsv_of(QAT_RESULTS, EMA)


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


def fp_control_ran(record: ExpRecord) -> bool:
    """Whether the run trained the FP-continued control: ``fp.control`` as resolved (a preset may
    turn it off) is true.  A run from before the param has none.  The one rule every table and
    the ladder use, so a stale control curve of a run that did not train one is never read."""
    params = record.params
    return "fp.control" in params and resolved_params(params).get("fp.control") is True


def fp_control_series(record: ExpRecord, curves: Curves) -> list[float | None] | None:
    """The FP-continued control's val curve of a run's curves, or None when the run did not
    train one (:func:`fp_control_ran`) or did not log it."""
    if not fp_control_ran(record):
        return None
    return curves.get("fp_control", {}).get(PRIMARY) or None


def curves_view(curves: Curves) -> dict[str, list[float] | None]:
    """The per-epoch curves the reports plot, from a run's curves: ``map`` (the deployed val
    mAP50-95), ``live`` and ``ema`` (the paired curves; None for runs made before they were
    logged), ``bnre`` (the deployed model after BN re-estimation; None unless
    qat.bn_reestimate was on), ``osc`` (osc/frac_oscillating) and ``fp_map`` (the FP baseline's
    val mAP50-95), and every repair curve by its prefix (``ema_qc``, ``live_bnre``, ...: None
    unless qat.repair_curves logged it; NaN at the epochs ``qat.repair_every`` skipped)."""
    qat, fp = curves.get("qat", {}), curves.get("train_fp", {})

    def pick(block: dict[str, list[float]], name: str) -> list[float] | None:
        # an archive file stores an epoch without a value as null, a TSV read as NaN: one form
        values = block.get(name)
        return [math.nan if x is None else x for x in values] if values is not None else None

    view = {"map": pick(qat, PRIMARY), "live": pick(qat, LIVE), "ema": pick(qat, EMA),
            "bnre": pick(qat, BNRE), "osc": pick(qat, OSC_FRACTION), "fp_map": pick(fp, PRIMARY)}
    for model, repair, key in logged_repairs(True, REPAIR_CURVES):
        view[repair_prefix(model, repair)] = pick(qat, key)
    return view


def read_curves(record: ExpRecord, repo: str | Path = ".") -> dict[str, list[float] | None]:
    """:func:`curves_view` of the run's curves (from its archive file, or read at its rev)."""
    return curves_view(run_curves(record, repo))

