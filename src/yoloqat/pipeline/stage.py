"""What every DVC stage entry does around its one job: config, offline setup, clean errors.

A stage that fails on bad input prints one line ``<stage>: error: <message>`` to stderr (the
stage is named once: messages never carry it), removes the outputs it owns (so DVC never caches
a half-written result) and exits with status 2.  Only one process runs a stage at a time
(:mod:`yoloqat.pipeline.lock`); a second one stops with one line and touches nothing.  The job
builds its outputs in a staging folder that is moved into place only when it succeeds
(:mod:`yoloqat.pipeline.staging`), so a killed stage leaves its previous outputs as they were.
The expected error types come from the light :mod:`yoloqat.errors`, so the error path imports
nothing heavy.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from yoloqat.config import Config, load_config
from yoloqat.errors import DataWarning, YoloqatError
from yoloqat.paths import STAGE_LOCKS
from yoloqat.pipeline.lock import one_writer
from yoloqat.pipeline.staging import mirror_of, staged_outputs
from yoloqat.provenance import clean_on_failure


def one_line(stage: str, exc: BaseException) -> str:
    """``<stage>: error: <first line of the message>``, with any repeated stage prefix dropped."""
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    while msg.startswith(f"{stage}: "):
        msg = msg[len(stage) + 2:]
    return f"{stage}: error: {msg}"


def _say_data_warnings(stage: str) -> None:
    """Print skipped-item warnings as ``<stage>: warning: <message>`` (no source location)."""
    plain = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, DataWarning):
            return f"{stage}: warning: {message}\n"
        return plain(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def run_stage(
    name: str,
    job: Callable[[Config], None],
    outputs: Callable[[Config], list[Path]],
    *,
    staged: bool = True,
) -> int:
    """Run ``job`` as DVC stage ``name``; ``outputs`` are the paths it owns.

    ``staged=False`` runs the job in place, for a stage whose writes are already atomic.
    """
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"DVC stage {name}")
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    args = parser.parse_args()
    try:
        cfg = load_config(args.params)
    except YoloqatError as exc:
        print(one_line(name, exc), file=sys.stderr)
        return 2
    os.chdir(cfg.root)
    _say_data_warnings(name)
    from yoloqat.offline import configure_offline

    configure_offline()
    outs = outputs(cfg)
    try:
        # The lock is taken outside clean_on_failure: a stage refused because another process
        # is writing must leave that process's outputs alone.
        with one_writer(STAGE_LOCKS / f"{name}.lock"), clean_on_failure(*outs):
            if staged and outs:
                with staged_outputs(cfg, name, outs) as staged_cfg:
                    job(staged_cfg)
            else:
                job(cfg)
    except YoloqatError as exc:
        # a message naming a file the job opened names it inside the mirror; the user knows
        # the real path
        msg = one_line(name, exc).replace(str(mirror_of(cfg.root, name)), str(cfg.root))
        print(msg, file=sys.stderr)
        return 2
    return 0
